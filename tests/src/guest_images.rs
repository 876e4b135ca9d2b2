//! Guest images the tests build themselves, byte by byte, to guest ABI v1: proof that the
//! ABI, not our own guest crate, is the contract.

/// A guest image written by hand to the ABI: it writes a console line, then counts ops in its
/// progress slot forever.
pub fn handmade_image() -> Vec<u8> {
    const BASE: u64 = 0x20_0000;
    let message = b"handmade guest up\n";
    // rdi = boot info on entry; progress slot 0 at boot + 256.
    let mut code: Vec<u8> = vec![
        0x48, 0x89, 0xFB, // mov rbx, rdi
        0x48, 0xBF, // mov rdi, imm64 (message)
    ];
    let message_at = BASE + 0x100;
    code.extend_from_slice(&message_at.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xC7, 0xC6]); // mov rsi, imm32 (len)
    code.extend_from_slice(&(message.len() as u32).to_le_bytes());
    code.extend_from_slice(&[
        0x66, 0xBA, 0x10, 0x05, // mov dx, 0x510
        0xB8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1 (console)
        0xEF, // out dx, eax
        // loop: inc qword [rbx + 256]; jmp loop
        0x48, 0xFF, 0x83, 0x00, 0x01, 0x00, 0x00, 0xEB, 0xF7,
    ]);
    let mut segment = code;
    segment.resize(0x100, 0x90);
    segment.extend_from_slice(message);
    elf_image(BASE, &segment)
}

/// A minimal static ELF64 x86-64 executable with one RWX PT_LOAD segment at `base`.
pub fn elf_image(base: u64, segment: &[u8]) -> Vec<u8> {
    let mut elf = Vec::new();
    let data_offset = 0x1000u64;
    elf.extend_from_slice(&[0x7F, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&base.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]);
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
    elf.extend_from_slice(&data_offset.to_le_bytes());
    elf.extend_from_slice(&base.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&base.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&(segment.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(segment.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.resize(data_offset as usize, 0);
    elf.extend_from_slice(segment);
    elf
}
