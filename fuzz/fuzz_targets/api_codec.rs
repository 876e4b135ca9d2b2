//! Fuzzes the API's wire codec (api::codec): its framing, and requests and responses that must round-trip; the checks live in `migrator::fuzzing`, shared with the regression tests.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrator::fuzzing::Target;

fuzz_target!(|data: &[u8]| {
    // Refusing an input is fine; panicking (a broken invariant) is the bug.
    let _ = Target::ApiCodec.feed(data);
});
