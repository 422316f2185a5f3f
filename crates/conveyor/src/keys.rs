//! The keys of keyed sends, shared by the items sent with an equal key rather than allocated
//! for every send.
//!
//! Every item's node holds its key (its lane's name, and what `Delivery::key` returns). Made
//! fresh for every send, the key cost an allocation and a copy on the producer's thread and a
//! free on the worker's, where glibc is slow to free what another thread allocated: a keyed
//! send took 140–220 ns against 16 for one without a key, 70–100 since (see BENCHMARKS.md).
//! Each thread that sends keeps the keys it sent last, a few dozen, and hands out another
//! reference to an equal one: a comparison and a count. A kept key's memory goes back on the
//! thread that took it once another key takes its slot, or the thread ends: not after a
//! while without sends, nor when the conveyor goes. So a thread keeps only short keys, at most
//! [`MAX_KEPT_LEN`] bytes, and at most [`SLOTS`] of them: a few KiB, however long the keys
//! sent and however many threads send. (What is left is mostly the `String` a `&str` key is
//! made into, and the count's cache line going back and forth between the producer and the
//! worker.)

use std::cell::RefCell;
use std::sync::Arc;

/// Keys a thread keeps, in slots picked by a hash of the key: a key shares the slot of others
/// now and then, and the one sent last takes it.
const SLOTS: usize = 64;

/// The longest key a thread keeps. Kept keys stay until another key takes their slot, for as
/// long as the thread lives (a pool's threads, for the process's life): unbounded, a thread
/// that once sent 64 keys of a megabyte kept 64 MiB, and every thread of a pool as much. A
/// longer key is made anew for each send, as before keys were kept; its copy costs more
/// than the allocation kept keys save.
const MAX_KEPT_LEN: usize = 256;

thread_local! {
    static RECENT: RefCell<[Option<Arc<str>>; SLOTS]> =
        const { RefCell::new([const { None }; SLOTS]) };
}

/// `key` as the items of its lane hold it: the reference this thread made for an equal key,
/// if it still keeps it, else a new one, which it keeps.
pub(crate) fn shared(key: &str) -> Arc<str> {
    if key.len() > MAX_KEPT_LEN {
        return Arc::from(key);
    }
    let slot = slot_of(key);
    RECENT
        .try_with(|recent| {
            // No user code runs while this is borrowed: dropping a key only frees a string.
            let mut recent = recent.borrow_mut();
            match &recent[slot] {
                Some(kept) if **kept == *key => Arc::clone(kept),
                _ => {
                    let made: Arc<str> = Arc::from(key);
                    recent[slot] = Some(Arc::clone(&made));
                    made
                }
            }
        })
        // The thread is going away (a send from a thread-local's destructor).
        .unwrap_or_else(|_| Arc::from(key))
}

/// FNV-1a, a few cycles a byte (keys are short), then the slot from the top bits of a
/// multiplication by 2^64 / φ (Fibonacci hashing): FNV's own low bits depend only on the low
/// bits of each byte, so that `"id-1"` and `"id-q"` always met in one slot.
fn slot_of(key: &str) -> usize {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (u64::BITS - SLOTS.ilog2())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys that differ only in the high bits of a byte (a digit and a letter) are spread
    /// like any others.
    #[test]
    fn keys_differing_in_a_bytes_high_bits_get_their_own_slots() {
        let sharing = ('0'..='9')
            .filter(|&digit| {
                let letter = char::from(digit as u8 + 0x40);
                slot_of(&format!("id-{digit}")) == slot_of(&format!("id-{letter}"))
            })
            .count();
        assert!(sharing <= 2, "{sharing} of 10 pairs share a slot");
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

    /// A key that another took the slot of is no longer kept (its memory goes once its items
    /// are gone), and is made anew, equal, when it is sent again.
    #[test]
    fn a_key_that_lost_its_slot_is_let_go() {
        let first = shared("key-0");
        assert_eq!(Arc::strong_count(&first), 2, "kept by its slot");
        let rival = (1..)
            .map(|i| format!("key-{i}"))
            .find(|k| slot_of(k) == slot_of("key-0"))
            .expect("some key shares the slot");
        let rival_key = shared(&rival);
        assert_eq!(
            &*rival_key, rival,
            "the slot's key is not handed out for another"
        );
        assert_eq!(
            Arc::strong_count(&first),
            1,
            "only the item's reference is left"
        );
        let again = shared("key-0");
        assert_eq!(again, first);
        assert!(!Arc::ptr_eq(&again, &first), "made anew");
    }

    /// A key longer than [`MAX_KEPT_LEN`] is not kept: the thread would hold it until another
    /// key took its slot, which may be never.
    #[test]
    fn a_long_key_is_not_kept() {
        let longest = "k".repeat(MAX_KEPT_LEN);
        let kept = shared(&longest);
        assert_eq!(Arc::strong_count(&kept), 2, "kept by its slot");
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
