//! The keys of keyed sends, shared by the items sent with an equal key rather than allocated
//! for every send.
//!
//! Every item's node holds its key (its lane's name, and what `Delivery::key` returns). Made
//! fresh for every send, the key cost an allocation and a copy on the producer's thread and a
//! free on the worker's, where glibc is slow to free what another thread allocated: a keyed
//! send took 140–220 ns against 16 for one without a key, 70–100 since (see BENCHMARKS.md).
//! Each thread that sends keeps the keys it made last, a few dozen, and hands out another
//! reference to an equal one: a comparison and a count. A kept key's memory goes back on the
//! thread that took it once other keys take its place, or the thread ends: not after a
//! while without sends, nor when the conveyor goes. So a thread keeps only short keys, at most
//! [`MAX_KEPT_LEN`] bytes, and at most 64 of them: a few KiB, however long the keys
//! sent and however many threads send. (What is left is mostly the `String` a `&str` key is
//! made into, and the count's cache line going back and forth between the producer and the
//! worker.)

use std::cell::RefCell;
use std::sync::Arc;

/// Keys a thread keeps: the two made last in each of [`SETS`] sets, the set picked by a hash
/// of the key. With one key a set, two keys of a user's sixteen that met in one took it from
/// each other at every send (a quarter of them made anew, 97 -> 124 ns a send in turn); a
/// third key must meet them for that now. Kept in the order they were made, not reordered
/// when sent: moving them on every send made it 110-113 ns instead of 94-99.
const SETS: usize = 32;

/// The longest key a thread keeps. Kept keys stay until other keys take their place, for as
/// long as the thread lives (a pool's threads, for the process's life): unbounded, a thread
/// that once sent 64 keys of a megabyte kept 64 MiB, and every thread of a pool as much. A
/// longer key is made anew for each send, as before keys were kept; its copy costs more
/// than the allocation kept keys save.
const MAX_KEPT_LEN: usize = 256;

thread_local! {
    static RECENT: RefCell<[[Option<Arc<str>>; 2]; SETS]> =
        const { RefCell::new([const { [const { None }; 2] }; SETS]) };
}

/// `key` as the items of its lane hold it: the reference this thread made for an equal key,
/// if it still keeps it, else a new one, which it keeps.
pub(crate) fn shared(key: &str) -> Arc<str> {
    if key.len() > MAX_KEPT_LEN {
        return Arc::from(key);
    }
    let set = set_of(key);
    RECENT
        .try_with(|recent| {
            // No user code runs while this is borrowed: dropping a key only frees a string.
            let [newer, older] = &mut recent.borrow_mut()[set];
            for kept in [&*newer, &*older].into_iter().flatten() {
                if **kept == *key {
                    return Arc::clone(kept);
                }
            }
            // Made in place of the one made longest ago.
            let made: Arc<str> = Arc::from(key);
            *older = newer.replace(Arc::clone(&made));
            made
        })
        // The thread is going away (a send from a thread-local's destructor).
        .unwrap_or_else(|_| Arc::from(key))
}

/// FNV-1a, a few cycles a byte (keys are short), then the set from the top bits of a
/// multiplication by 2^64 / φ (Fibonacci hashing): FNV's own low bits depend only on the low
/// bits of each byte, so that `"id-1"` and `"id-q"` always met in one set.
fn set_of(key: &str) -> usize {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (u64::BITS - SETS.ilog2())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys that differ only in the high bits of a byte (a digit and a letter) are spread
    /// like any others.
    #[test]
    fn keys_differing_in_a_bytes_high_bits_get_their_own_sets() {
        let sharing = ('0'..='9')
            .filter(|&digit| {
                let letter = char::from(digit as u8 + 0x40);
                set_of(&format!("id-{digit}")) == set_of(&format!("id-{letter}"))
            })
            .count();
        assert!(sharing <= 2, "{sharing} of 10 pairs share a set");
    }

    #[test]
    fn an_equal_key_is_the_same_allocation() {
        let first = shared("user-1");
        let again = shared(&String::from("user-1"));
        assert!(Arc::ptr_eq(&first, &again));
        let other = shared("user-2");
        assert_eq!(&*other, "user-2");
        assert!(!Arc::ptr_eq(&first, &other));
    }

    /// A key is no longer kept once two other keys of its set were made after it (its memory
    /// goes once its items are gone), and is made anew, equal, when sent again.
    #[test]
    fn a_key_that_others_pushed_out_is_let_go() {
        let rivals: Vec<String> = (1..)
            .map(|i| format!("key-{i}"))
            .filter(|k| set_of(k) == set_of("key-0"))
            .take(2)
            .collect();
        let first = shared("key-0");
        assert_eq!(Arc::strong_count(&first), 2, "kept by its set");
        let second = shared(&rivals[0]);
        assert!(
            Arc::ptr_eq(&shared("key-0"), &first),
            "one other made since: kept"
        );
        let third = shared(&rivals[1]);
        assert_eq!(&*second, rivals[0]);
        assert_eq!(
            &*third, rivals[1],
            "a kept key is not handed out for another"
        );
        assert_eq!(
            Arc::strong_count(&first),
            1,
            "two others made since: only the item's reference is left"
        );
        assert_eq!(Arc::strong_count(&second), 2, "still kept");
        let again = shared("key-0");
        assert_eq!(again, first);
        assert!(!Arc::ptr_eq(&again, &first), "made anew");
    }

    /// A key longer than [`MAX_KEPT_LEN`] is not kept: the thread would hold it until other
    /// keys took its place, which may be never.
    #[test]
    fn a_long_key_is_not_kept() {
        let longest = "k".repeat(MAX_KEPT_LEN);
        let kept = shared(&longest);
        assert_eq!(Arc::strong_count(&kept), 2, "kept by its set");
        let long = "k".repeat(MAX_KEPT_LEN + 1);
        let made = shared(&long);
        assert_eq!(&*made, long);
        assert_eq!(Arc::strong_count(&made), 1, "held by the item alone");
    }

    /// A send from a thread-local's destructor that runs after this thread's kept keys are
    /// gone (destructors run in the reverse order of the thread-locals' first use) still gets
    /// its key, made anew, rather than a panic, which aborts the process there.
    #[test]
    fn a_key_is_made_after_the_kept_ones_are_gone() {
        struct SendsOnDrop(std::sync::mpsc::Sender<Arc<str>>);
        impl Drop for SendsOnDrop {
            fn drop(&mut self) {
                let _ = self.0.send(shared("late"));
            }
        }
        thread_local! {
            static LATE: RefCell<Option<SendsOnDrop>> = const { RefCell::new(None) };
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Used first, so destroyed after `RECENT`.
            LATE.with(|late| *late.borrow_mut() = Some(SendsOnDrop(tx)));
            shared("early");
        })
        .join()
        .expect("the thread ends");
        assert_eq!(&*rx.recv().expect("sent from the destructor"), "late");
    }

    #[test]
    fn threads_keep_their_own_keys() {
        let here = shared("shared-name");
        let there = std::thread::spawn(|| shared("shared-name")).join().unwrap();
        assert_eq!(here, there);
        assert!(!Arc::ptr_eq(&here, &there), "made on each thread");
    }
}
