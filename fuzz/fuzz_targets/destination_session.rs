//! Fuzzes the destination's session (migration::destination, driven by its `offline` seam): data connections and control calls in any order against its phase machine and a small guest memory. It covers the frames' decoding and installing, `Done` and discards, failures, abort, discard, finish, recovery and every phase change; it cannot reach the KVM restore and resume, userfaultfd, TLS, or connections read at the same time. The checks live in `migrator::fuzzing`, shared with the regression tests.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrator::fuzzing::Target;

fuzz_target!(|data: &[u8]| {
    // Refusing an input is fine; panicking (a broken invariant) is the bug.
    let _ = Target::DestinationSession.feed(data);
});
