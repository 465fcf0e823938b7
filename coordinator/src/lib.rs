//! The Peergrid coordinator.
