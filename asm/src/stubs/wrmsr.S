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
	push %rax
	push %rcx
	push %rdx
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
	mov %eax, %esi
	call {handler}
	leave
	neg %rax
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	jc .Lxenmsr_wrmsr_slow
	pop %rax
	ret
.Lxenmsr_wrmsr_slow:
	cmp ${neg_native}, %rax
	jne .Lxenmsr_wrmsr_fail
	pop %rax
.Lxenmsr_wrmsr_native:
	wrmsr
	ret
.Lxenmsr_wrmsr_fail:
	neg %rax
	xchg %rax, (%rsp)
.Lxenmsr_wrmsr_trap:
	ud2
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
