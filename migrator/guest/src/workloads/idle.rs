//! `idle`: does nothing but wake every 10 ms and say so (each wake-up counts as an op).

use super::{Runner, WorkloadError};
use crate::Platform;

pub fn run<'a, P: Platform>(runner: &mut Runner<'_, P>) -> Result<(), WorkloadError<'a>> {
    while !runner.should_stop() {
        runner.platform().sleep(10_000_000);
        runner.op_done();
        runner.publish();
    }
    Ok(())
}
