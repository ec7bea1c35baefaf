# Kernel-mode part of the test guest (AT&T syntax). Everything here runs at CPL0, which
# some hosts emulate ~1000x slower than native, so it is kept to a few instructions:
# the page tables, GDT and TSS are static data; only the TSS descriptor base and the IDT
# gates are filled at run time.
#
# PVH entry: 32-bit protected mode, paging off, %ebx = physical address of hvm_start_info.

    .section .note.pvh, "a", @note
    .balign 4
    .long 4                     # namesz
    .long 8                     # descsz
    .long 18                    # XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .quad pvh_start

    .section .text.boot, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    movl %ebx, boot_start_info
    lgdt gdt_ptr
    movl %cr4, %eax
    orl $0x620, %eax            # PAE | OSFXSR | OSXMMEXCPT
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx      # EFER.LME
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xFFFFFFFB, %eax      # clear EM
    orl $0x80000003, %eax       # PG | MP | PE
    movl %eax, %cr0
    ljmp $0x08, $long_entry

    .code64
long_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    leaq kstack_top(%rip), %rsp
    # TSS descriptor base.
    leaq tss(%rip), %rax
    leaq gdt_tss(%rip), %rdi
    movw %ax, 2(%rdi)
    shrq $16, %rax
    movb %al, 4(%rdi)
    movb %ah, 7(%rdi)
    shrq $16, %rax
    movl %eax, 8(%rdi)
    movw $0x28, %ax
    ltr %ax
    # IDT: 256 interrupt gates (DPL0) from the handler table.
    leaq idt(%rip), %rdi
    leaq idt_handlers(%rip), %rsi
    movl $256, %ecx
1:  movq (%rsi), %rax
    movw %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8E00, 4(%rdi)
    shrq $16, %rax
    movw %ax, 6(%rdi)
    shrq $16, %rax
    movq %rax, 8(%rdi)
    addq $8, %rsi
    addq $16, %rdi
    decl %ecx
    jnz 1b
    lidt idt_ptr(%rip)
    # Mask the legacy PICs.
    movb $0xFF, %al
    outb %al, $0x21
    outb %al, $0xA1
    # To 64-bit user mode, IOPL 3, interrupts on: nothing can interrupt before the guest
    # unmasks MSI-X entries (PICs masked, LAPIC timer masked at reset), and CPL3 sti/cli
    # would fault where an emulated return loses IOPL.
    pushq $0x1B
    leaq ustack_top - 8(%rip), %rax
    pushq %rax
    pushq $0x3202
    pushq $0x23
    leaq guest_main(%rip), %rax
    pushq %rax
    iretq

# Exceptions: push a dummy error code where the CPU pushes none, then the vector.
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
fault_\n:
    .if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
    pushq $0
    .endif
    pushq $\n
    jmp fault_common
    .endr

fault_common:
    movq (%rsp), %rdi           # vector
    movq 8(%rsp), %rsi          # error code
    movq 16(%rsp), %rdx         # rip
    movq %cr2, %rcx
    andq $-16, %rsp
    call guest_fault
2:  hlt
    jmp 2b

# MSI-X vectors 0x40..0x4F: count, EOI, return.
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
msix_\n:
    incq irq_counts + 8 * \n (%rip)
    pushq %rax
    movl $0xFEE000B0, %eax
    movl $0, (%rax)
    popq %rax
    iretq
    .endr

# Anything else (including the LAPIC spurious vector): count, EOI, return.
unexpected_irq:
    incq unexpected_irqs(%rip)
    pushq %rax
    movl $0xFEE000B0, %eax
    movl $0, (%rax)
    popq %rax
    iretq

    .section .rodata
    .balign 8
idt_handlers:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad fault_\n
    .endr
    .rept 32
    .quad unexpected_irq
    .endr
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .quad msix_\n
    .endr
    .rept 256 - 80
    .quad unexpected_irq
    .endr

# Identity map of the low 4 GiB with 2 MiB user-accessible pages (RAM, ECAM, BARs, LAPIC).
    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 7
    .fill 511, 8, 0
pdpt:
    .quad pd + 7
    .quad pd + 0x1000 + 7
    .quad pd + 0x2000 + 7
    .quad pd + 0x3000 + 7
    .fill 508, 8, 0
pd:
    .set i, 0
    .rept 2048
    .quad (i << 21) | 0x87      # present, writable, user, 2 MiB
    .set i, i + 1
    .endr

    .section .data, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF    # 0x08 kernel code 64
    .quad 0x00CF92000000FFFF    # 0x10 kernel data
    .quad 0x00CFF2000000FFFF    # 0x18 user data (0x1B)
    .quad 0x00AFFA000000FFFF    # 0x20 user code 64 (0x23)
gdt_tss:                        # 0x28 64-bit TSS, base filled at run time
    .word tss_end - tss - 1
    .word 0
    .byte 0
    .byte 0x89
    .byte 0
    .byte 0
    .long 0
    .long 0
gdt_end:

    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
idt_ptr:
    .word 256 * 16 - 1
    .quad idt

    .globl boot_start_info
    .balign 8
boot_start_info:
    .quad 0

# TSS with an I/O permission bitmap allowing every port, so CPL3 port I/O does not depend
# on IOPL (which some emulated interrupt returns lose).
    .balign 16
tss:
    .long 0
    .quad kstack_top            # RSP0
    .fill 88, 1, 0
    .word 0
    .word 104                   # I/O map base
    .fill 8192, 1, 0
    .byte 0xFF
tss_end:

    .section .bss
    .balign 16
    .globl irq_counts
irq_counts:
    .fill 16, 8, 0
    .globl unexpected_irqs
unexpected_irqs:
    .quad 0
    .balign 16
idt:
    .fill 256 * 16, 1, 0
    .balign 16
kstack:
    .fill 16384, 1, 0
kstack_top:
ustack:
    .fill 65536, 1, 0
ustack_top:
