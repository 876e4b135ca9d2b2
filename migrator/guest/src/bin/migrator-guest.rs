//! The built-in guest image: boots under guest ABI v1 and runs the workload its args name.
//!
//! Built by `cargo xtask build` for `x86_64-unknown-none` with SSE enabled (see xtask's
//! `build`) and embedded in the `migrator` binary. On the host this is an empty shell so workspace-wide builds and lints work.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod guest {
    use core::{arch::asm, fmt::Write};

    use migrator_guest::{
        BootInfo, Platform, Progress,
        abi::{HYPERCALL_PORT, PROGRESS_OFFSET, hypercall},
        args::Args,
        workloads::{self, WorkloadError},
    };

    unsafe extern "C" {
        /// End of the image, from the linker script: the workload's memory starts here.
        static __image_end: u8;
    }

    /// Entry, per vCPU: RDI = boot info, RSI = vCPU index, RSP = top of this vCPU's stack.
    /// Aligns the stack as a call would have, then enters Rust.
    #[unsafe(naked)]
    #[unsafe(no_mangle)]
    #[unsafe(link_section = ".text._start")]
    extern "C" fn _start() -> ! {
        core::arch::naked_asm!("and rsp, -16", "call {main}", "ud2", main = sym main);
    }

    fn hypercall(number: u32, arg0: u64, arg1: u64) {
        // SAFETY: `out` to the hypercall port exits to the VMM, which reads RDI/RSI and resumes
        // us after the instruction; no memory is touched.
        unsafe {
            asm!("out dx, eax", in("dx") HYPERCALL_PORT, in("eax") number,
                 in("rdi") arg0, in("rsi") arg1, options(nostack, preserves_flags));
        }
    }

    fn exit(code: u64) -> ! {
        loop {
            hypercall(hypercall::EXIT, code, 0);
        }
    }

    struct Console;

    impl Write for Console {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            hypercall(hypercall::CONSOLE_WRITE, s.as_ptr() as u64, s.len() as u64);
            Ok(())
        }
    }

    struct Guest {
        progress: *mut Progress,
        tsc_khz: u64,
    }

    impl Platform for Guest {
        fn ticks(&self) -> u64 {
            // SAFETY: rdtsc reads the time-stamp counter; CR4.TSD is clear.
            unsafe { core::arch::x86_64::_rdtsc() }
        }

        fn ticks_per_ms(&self) -> u64 {
            self.tsc_khz
        }

        fn report(&mut self, progress: &Progress) {
            // SAFETY: our slot of the boot-info page, which the VMM only reads.
            unsafe { core::ptr::write_volatile(self.progress, *progress) };
        }

        fn check_failed(&mut self, detail0: u64, detail1: u64) {
            hypercall(hypercall::CHECK_FAILED, detail0, detail1);
        }

        fn console(&mut self, text: &str) {
            let _ = Console.write_str(text);
        }

        fn sleep(&mut self, nanos: u64) {
            hypercall(hypercall::SLEEP, nanos, 0);
        }

        fn should_stop(&self, _progress: &Progress) -> bool {
            false
        }
    }

    extern "C" fn main(boot: *mut BootInfo, vcpu: u64) -> ! {
        // SAFETY: the VMM passes the boot-info page's address; it is mapped and ours, and
        // its header is the first PROGRESS_OFFSET bytes.
        let header = unsafe { core::slice::from_raw_parts(boot.cast::<u8>(), PROGRESS_OFFSET) };
        // A header the guest cannot trust (magic, version, vCPUs, memory, args) stops it here.
        let Ok(info) = BootInfo::decode(header) else {
            exit(0xbad0);
        };
        let vcpu = vcpu as u32;
        let vcpus = info.vcpu_count.max(1);
        // SAFETY: the progress array follows the header; vcpu < vcpu_count by the ABI.
        let progress = unsafe {
            boot.cast::<u8>()
                .add(PROGRESS_OFFSET)
                .cast::<Progress>()
                .add(vcpu as usize)
        };
        let mut guest = Guest {
            progress,
            tsc_khz: info.tsc_khz.max(1),
        };
        let Some(text) = info.args_str() else {
            let _ = writeln!(Console, "args are not UTF-8");
            exit(2);
        };
        // Memory from the end of the image to the stacks, split evenly between vCPUs.
        let image_end = (&raw const __image_end) as u64;
        let range = workloads::vcpu_share(image_end, info.mem_size, vcpus, vcpu);
        let share = range.end - range.start;
        // SAFETY: the range lies between the image and the stacks, is identity mapped, and no
        // other vCPU uses it.
        let mem = unsafe {
            core::slice::from_raw_parts_mut(range.start as *mut u64, (share / 8) as usize)
        };
        if vcpu == 0 {
            let _ = writeln!(
                Console,
                "migrator-guest: {text} ({vcpus} vCPUs, {} MiB each)",
                share >> 20
            );
        }
        let result = workloads::run(&Args::new(text), mem, vcpu, vcpus, &mut guest);
        match result {
            Ok(()) => exit(0),
            Err(e) => {
                match e {
                    WorkloadError::Unknown(name) => {
                        let _ = writeln!(
                            Console,
                            "unknown workload `{name}`; built in: {:?}",
                            workloads::NAMES
                        );
                    }
                    WorkloadError::NoName => {
                        let _ = writeln!(
                            Console,
                            "args name no workload; built in: {:?}",
                            workloads::NAMES
                        );
                    }
                    WorkloadError::BadArg(key) => {
                        let _ = writeln!(Console, "bad value for argument `{key}`");
                    }
                    WorkloadError::UnknownArg(key) => {
                        let name = Args::new(text).name().unwrap_or_default();
                        let _ = writeln!(Console, "`{name}` takes no argument `{key}`");
                    }
                    WorkloadError::TooSmall => {
                        let _ = writeln!(Console, "not enough memory for these arguments");
                    }
                }
                exit(1)
            }
        }
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo) -> ! {
        let _ = writeln!(Console, "guest panic: {info}");
        exit(0xdead)
    }
}
