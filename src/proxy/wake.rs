//! How a session's sources wake its task: each socket (and the shutdown
//! token with the session's timer) has a waker of its own that marks it,
//! so that a wake-up polls what woke the session rather than everything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Wake, Waker};

use futures_util::task::AtomicWaker;

/// Which of the session's sources woke it since it last looked: a socket
/// (or the shutdown token and the timer) that waits is polled again only
/// once it has woken the session, so a wake-up costs the polls of what
/// woke it, not of everything.
pub(super) struct Wakers {
    marks: Arc<Marks>,
    pub(super) client_waker: Waker,
    pub(super) directory_waker: Waker,
    pub(super) signals_waker: Waker,
}

/// A source of wake-ups.
#[derive(Clone, Copy)]
pub(super) enum Source {
    Client,
    Directory,
    /// The shutdown token and the session's timer.
    Signals,
}

/// The sources' marks and the task's waker, in one allocation: a poll
/// reads them all, and every other session's polls come between two of
/// this one's, so each allocation is a cache line fetched again.
#[derive(Default)]
struct Marks {
    woken: [AtomicBool; 3],
    task: TaskWaker,
}

impl Wakers {
    pub(super) fn new() -> Wakers {
        let marks = Arc::new(Marks::default());
        let waker = |source| {
            Waker::from(Arc::new(SourceWaker {
                marks: Arc::clone(&marks),
                source,
            }))
        };
        Wakers {
            client_waker: waker(Source::Client),
            directory_waker: waker(Source::Directory),
            signals_waker: waker(Source::Signals),
            marks,
        }
    }

    /// The waker of the task polling now is the one to wake; call before
    /// looking at what woke it.
    pub(super) fn register(&self, waker: &Waker) {
        self.marks.task.register(waker);
    }

    /// Whether `source` woke the session since the last look (and forgets it).
    pub(super) fn woke(&self, source: Source) -> bool {
        let woken = &self.marks.woken[source as usize];
        woken.load(Ordering::SeqCst) && woken.swap(false, Ordering::SeqCst)
    }
}

/// One source's waker: marks the source, then wakes the session's task.
struct SourceWaker {
    marks: Arc<Marks>,
    source: Source,
}

impl Wake for SourceWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // SeqCst with `TaskWaker::register`'s: see there.
        self.marks.woken[self.source as usize].store(true, Ordering::SeqCst);
        self.marks.task.wake();
    }
}

/// The session task's waker. A task's waker stays the same from poll to
/// poll, so it is kept once and then only read, at each poll and each
/// wake-up: an `AtomicWaker` is written at both (a waker taken out, a
/// clone put back), which moved its cache line — and the task's reference
/// count — between the cores that poll and wake, at every wake-up (the
/// relay's profile showed it). Should a poll come with another waker all
/// the same, it is kept in an `AtomicWaker` from then on.
#[derive(Default)]
struct TaskWaker {
    first: OnceLock<Waker>,
    changed: AtomicBool,
    later: AtomicWaker,
}

impl TaskWaker {
    fn register(&self, waker: &Waker) {
        if !self.changed.load(Ordering::Relaxed) {
            match self.first.get() {
                Some(first) if first.will_wake(waker) => return,
                None if self.first.set(waker.clone()).is_ok() => return,
                // Only the polling task registers: `first` cannot have been
                // set by anyone else in between.
                _ => {
                    // A source that woke `first` before it could see this
                    // (SeqCst both sides) had marked itself before: the
                    // poll that follows this registration finds the mark.
                    self.later.register(waker);
                    self.changed.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
        self.later.register(waker);
    }

    fn wake(&self) {
        if self.changed.load(Ordering::SeqCst) {
            self.later.wake();
        } else if let Some(first) = self.first.get() {
            first.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        (Arc::clone(&count), Waker::from(count))
    }

    #[test]
    fn a_source_marks_itself_and_wakes_the_task_that_polled_last() {
        let wakers = Wakers::new();
        let (first, first_waker) = counting();
        wakers.register(&first_waker);
        wakers.directory_waker.wake_by_ref();
        assert_eq!(first.0.load(Ordering::SeqCst), 1);
        assert!(
            wakers.woke(Source::Directory) && !wakers.woke(Source::Directory),
            "marked once"
        );
        assert!(!wakers.woke(Source::Client), "the client did not wake it");

        wakers.register(&first_waker);
        let (second, second_waker) = counting();
        for wakes in 1..=2 {
            wakers.register(&second_waker);
            wakers.client_waker.wake_by_ref();
            assert_eq!(second.0.load(Ordering::SeqCst), wakes, "a new waker is the one woken");
            assert!(wakers.woke(Source::Client));
        }
        assert_eq!(first.0.load(Ordering::SeqCst), 1, "the old one no longer");
    }

    #[test]
    fn a_source_woken_before_any_poll_is_marked_all_the_same() {
        let wakers = Wakers::new();
        wakers.signals_waker.wake_by_ref();
        let (task, waker) = counting();
        wakers.register(&waker);
        assert!(wakers.woke(Source::Signals));
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
    }
}
