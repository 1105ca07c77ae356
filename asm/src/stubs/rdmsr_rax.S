/*
 * xenmsr_stub_rdmsr_rax: RDMSR for constant-index sites, value in rax.
 *
 *   in:        ecx = MSR index
 *   out:       rax = the whole 64-bit value, rdx = its high half (zero-extended)
 *   preserved: every other GPR (including all of rcx) and rsp
 *   clobbered: flags
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
	push %rcx
	push %rsi
	push %rdi
	push %r8
	push %r9
	push %r10
	push %r11
	push %rbp
	mov %rsp, %rbp
	and $-16, %rsp
	mov %ecx, %edi
	call {handler}
	leave
	neg %rax
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rdi
	pop %rsi
	pop %rcx
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
.Lxenmsr_rdmsr_rax_trap:
	ud2
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
