/*
 * xenmsr_stub_rdmsr_rax: RDMSR for constant-index sites, value in rax.
 *
 *   in:        ecx = MSR index
 *   out:       rax = the whole 64-bit value, rdx = its high half (zero-extended)
 *   preserved: every other GPR (including all of rcx) and rsp
 *   clobbered: flags
 *   stack:     16-byte aligned at the site's `call` (every Rust `asm!` block without
 *              `nostack` guarantees it): the 7 pushes below keep it aligned for the call
 *
 * The same structure as xenmsr_stub_rdmsr (see rdmsr.S); only the output shuffles differ.
 * Callers' extable entries carry RAX_CONTRACT, so a failure zeroes rax.
 */
	.pushsection .text.xenmsr_stub_rdmsr_rax,"ax",@progbits
	.balign 16
	.globl xenmsr_stub_rdmsr_rax
	.hidden xenmsr_stub_rdmsr_rax
	.type xenmsr_stub_rdmsr_rax,@function
xenmsr_stub_rdmsr_rax:
	.cfi_startproc
	push %rcx
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rcx, 0
	push %rsi
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rsi, 0
	push %rdi
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rdi, 0
	push %r8
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %r8, 0
	push %r9
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %r9, 0
	push %r10
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %r10, 0
	push %r11
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %r11, 0
	mov %ecx, %edi
	call {handler}
	neg %rax
	pop %r11
	.cfi_adjust_cfa_offset -8
	.cfi_restore %r11
	pop %r10
	.cfi_adjust_cfa_offset -8
	.cfi_restore %r10
	pop %r9
	.cfi_adjust_cfa_offset -8
	.cfi_restore %r9
	pop %r8
	.cfi_adjust_cfa_offset -8
	.cfi_restore %r8
	pop %rdi
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rdi
	pop %rsi
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rsi
	pop %rcx
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rcx
	jc .Lxenmsr_rdmsr_rax_slow
	mov %rdx, %rax
	shr $32, %rdx
	ret
.Lxenmsr_rdmsr_rax_slow:
	cmp ${neg_native}, %rax
	jne .Lxenmsr_rdmsr_rax_fail
.Lxenmsr_rdmsr_rax_native:
	rdmsr
	shl $32, %rdx
	or %rdx, %rax
	shr $32, %rdx
	ret
.Lxenmsr_rdmsr_rax_fail:
	neg %rax
	push %rax
	.cfi_adjust_cfa_offset 8
.Lxenmsr_rdmsr_rax_trap:
	ud2
	.cfi_endproc
	.size xenmsr_stub_rdmsr_rax, . - xenmsr_stub_rdmsr_rax

	.pushsection xenmsr_extable,"awR",@progbits
	.balign 4
	.long .Lxenmsr_rdmsr_rax_native - .
	.long .Lxenmsr_rdmsr_rax_native - .
	.long {rewind_native}
	.long .Lxenmsr_rdmsr_rax_trap - .
	.long .Lxenmsr_rdmsr_rax_trap - .
	.long {rewind_error}
	.popsection
	.popsection
