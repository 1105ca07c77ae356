/*
 * xenmsr_stub_rdpmc: RDPMC with the native register contract.
 *
 *   in:        ecx = counter index
 *   out:       eax = low half, edx = high half; the upper halves of rax and rdx are zero
 *   preserved: every other GPR (including all of rcx) and rsp
 *   clobbered: flags
 *   stack:     16-byte aligned at the site's `call` (every Rust `asm!` block without
 *              `nostack` guarantees it): the 7 pushes below keep it aligned for the call
 *
 * Entered only by the 5-byte `call` of a site that has its own extable entry.
 * Calls `xenmsr_handle_rdpmc(counter: u32) -> RawOutcome` (C ABI, rax = status, rdx = value):
 *   status 0: done, rdx = value;
 *   status 1: execute the real RDPMC here (REWIND entry, skip 0: a fault is reported at
 *             the caller's call site as Fault);
 *   else:     error code; push it and trap at ud2 (REWIND entry, skip 1, carries error).
 * `neg` sets CF exactly when the status is not 0, and the pops that follow keep the flags,
 * so one `jc` leaves the fast path for both "native" and "failed".
 */
	.pushsection .text.xenmsr_stub_rdpmc,"ax",@progbits
	.balign 16
	.globl xenmsr_stub_rdpmc
	.hidden xenmsr_stub_rdpmc
	.type xenmsr_stub_rdpmc,@function
xenmsr_stub_rdpmc:
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
	jc .Lxenmsr_rdpmc_slow
	mov %edx, %eax
	shr $32, %rdx
	ret
.Lxenmsr_rdpmc_slow:
	cmp ${neg_native}, %rax
	jne .Lxenmsr_rdpmc_fail
.Lxenmsr_rdpmc_native:
	rdpmc
	ret
.Lxenmsr_rdpmc_fail:
	neg %rax
	push %rax
	.cfi_adjust_cfa_offset 8
.Lxenmsr_rdpmc_trap:
	ud2
	.cfi_endproc
	.size xenmsr_stub_rdpmc, . - xenmsr_stub_rdpmc

	.pushsection xenmsr_extable,"awR",@progbits
	.balign 4
	.long .Lxenmsr_rdpmc_native - .
	.long .Lxenmsr_rdpmc_native - .
	.long {rewind_native}
	.long .Lxenmsr_rdpmc_trap - .
	.long .Lxenmsr_rdpmc_trap - .
	.long {rewind_error}
	.popsection
	.popsection
