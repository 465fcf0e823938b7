//! Blob protocol: serve chunks, verified multi-source download.
