//! The scheduling priority of the threads that compute (task slots, the wasm compiler).
//!
//! A volunteer's machine belongs to its owner: by default those threads run at the lowest
//! priority the OS offers (`SCHED_IDLE` on Linux: they only get CPU time nobody else wants;
//! nice 19 elsewhere). A dedicated machine (a cluster node, a CI runner, a cloud instance
//! donated whole) may ask for `normal` so that other load cannot starve its tasks, much as
//! BOINC's `no_priority_change` option does.

/// Priority of the computing threads (`worker join --priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Priority {
    /// Only CPU time nobody else wants (`SCHED_IDLE`, or nice 19).
    #[default]
    Idle,
    /// The OS's normal priority: for machines dedicated to the grid.
    Normal,
}

/// Put the calling thread at `priority`. Returns whether it now runs at `SCHED_IDLE`.
pub fn set_current_thread(priority: Priority) -> bool {
    if priority == Priority::Normal {
        return false;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread with valid arguments.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        }
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    // SAFETY: as above.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
    current_thread_is_idle()
}

/// Is the calling thread at `SCHED_IDLE`? (Always false off Linux.)
pub fn current_thread_is_idle() -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: reads the calling thread's policy.
    unsafe {
        return libc::sched_getscheduler(0) == libc::SCHED_IDLE;
    }
    #[allow(unreachable_code)]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_lowers_the_thread_and_normal_leaves_it_alone() {
        let normal = std::thread::spawn(|| set_current_thread(Priority::Normal))
            .join()
            .unwrap();
        assert!(!normal);
        assert!(!std::thread::spawn(current_thread_is_idle).join().unwrap());
        #[cfg(target_os = "linux")]
        assert!(std::thread::spawn(|| set_current_thread(Priority::Idle))
            .join()
            .unwrap());
    }
}
