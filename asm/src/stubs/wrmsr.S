/*
 * xenmsr_stub_wrmsr: WRMSR (and WRMSRNS) with the native register contract.
 *
 *   in:        ecx = MSR index, edx:eax = value (upper halves of rax and rdx ignored)
 *   out:       nothing
 *   preserved: every GPR and rsp
 *   clobbered: flags
 *
 * Entered only by the 5-byte `call` of a site that has its own extable entry.
 * Calls `xenmsr_handle_write(msr: u32, lo: u32, hi: u32) -> RawOutcome` (C ABI: edi, esi,
 * edx; hi is already in edx, so the value is never recombined here):
 *   status 0: done;
 *   status 1: restore everything and execute the real WRMSR here (REWIND entry, skip 0);
 *   else:     error code. The caller's rax is the last saved word; `xchg` swaps the code
 *             into that slot and the caller's rax back into rax, so every register is the
 *             caller's again and the code sits just above the return address for the
 *             ud2's REWIND entry (skip 1, carries error).
 * `neg` sets CF exactly when the status is not 0; the pops keep the flags.
 */
	.pushsection .text.xenmsr_stub_wrmsr,"ax",@progbits
	.balign 16
	.globl xenmsr_stub_wrmsr
	.hidden xenmsr_stub_wrmsr
	.type xenmsr_stub_wrmsr,@function
xenmsr_stub_wrmsr:
	.cfi_startproc
	push %rax
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rax, 0
	push %rcx
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rcx, 0
	push %rdx
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rdx, 0
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
	push %rbp
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rbp, 0
	mov %rsp, %rbp
	.cfi_def_cfa_register %rbp
	and $-16, %rsp
	mov %ecx, %edi
	mov %eax, %esi
	call {handler}
	leave
	.cfi_def_cfa %rsp, 80
	.cfi_restore %rbp
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
	pop %rdx
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rdx
	pop %rcx
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rcx
	jc .Lxenmsr_wrmsr_slow
	/* From here the paths differ in what is on the stack: each keeps its own CFI state. */
	.cfi_remember_state
	pop %rax
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rax
	ret
	.cfi_restore_state
.Lxenmsr_wrmsr_slow:
	cmp ${neg_native}, %rax
	jne .Lxenmsr_wrmsr_fail
	.cfi_remember_state
	pop %rax
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rax
.Lxenmsr_wrmsr_native:
	wrmsr
	ret
	.cfi_restore_state
.Lxenmsr_wrmsr_fail:
	neg %rax
	xchg %rax, (%rsp)
	/* rax is the caller's again; its slot holds the error code. */
	.cfi_restore %rax
.Lxenmsr_wrmsr_trap:
	ud2
	.cfi_endproc
	.size xenmsr_stub_wrmsr, . - xenmsr_stub_wrmsr

	.pushsection xenmsr_extable,"awR",@progbits
	.balign 4
	.long .Lxenmsr_wrmsr_native - .
	.long .Lxenmsr_wrmsr_native - .
	.long {rewind_native}
	.long .Lxenmsr_wrmsr_trap - .
	.long .Lxenmsr_wrmsr_trap - .
	.long {rewind_error}
	.popsection
	.popsection
