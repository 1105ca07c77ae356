/*
 * xenmsr_stub_rdmsr: RDMSR with the native register contract.
 *
 *   in:        ecx = MSR index
 *   out:       eax = low half, edx = high half; the upper halves of rax and rdx are zero
 *   preserved: every other GPR (including all of rcx) and rsp
 *   clobbered: flags
 *   stack:     16-byte aligned at the site's `call` (every Rust `asm!` block without
 *              `nostack` guarantees it), so rsp = 8 (mod 16) here
 *
 * Entered only by the 5-byte `call` of a site that has its own extable entry.
 *
 * Fast path, no Rust: the read filter (fastpath.rs). The stub loads the filter pointer
 * once and reads the multiplier, the key and the kind from that one table (filters are
 * immutable and published whole, so a racing re-install cannot mix two). A null pointer
 * diverts every read to the policy. Unless the MSR is one of the filter's keys, the stub
 * executes RDMSR itself (Xen traps and emulates it). A fault there is reported at the
 * caller's call site (REWIND entry, skip 0, Fault).
 * A key's kind 1 or 2 reads the FS or kernel GS base with RDFSBASE/RDGSBASE (a #UD, were
 * CR4.FSGSBASE off on this CPU, is reported the same way); kind 0 asks the policy:
 *
 * Policy path: saves the caller-saved registers that are not outputs (7 pushes keep the
 * stack aligned for the call), calls `xenmsr_handle_read(msr: u32) -> RawOutcome` (C ABI,
 * rax = status, rdx = value):
 *   status 0: done, rdx = value;
 *   status 1: execute the real RDMSR (the fast path's, with its REWIND entry);
 *   else:     error code; push it and trap at ud2 (REWIND entry, skip 1, carries error).
 * `neg` sets CF exactly when the status is not 0, and the pops that follow keep the flags,
 * so one `jc` leaves for both "native" and "failed".
 */
	.pushsection .text.xenmsr_stub_rdmsr,"ax",@progbits
	.balign 16
	.globl xenmsr_stub_rdmsr
	.hidden xenmsr_stub_rdmsr
	.type xenmsr_stub_rdmsr,@function
xenmsr_stub_rdmsr:
	.cfi_startproc
	mov {filter}(%rip), %rdx
	test %rdx, %rdx
	jz .Lxenmsr_rdmsr_policy
	mov %ecx, %eax
	imull {mul}(%rdx), %eax
	shr ${shift}, %eax
	cmp %ecx, {keys}(%rdx,%rax,4)
	je .Lxenmsr_rdmsr_hit
.Lxenmsr_rdmsr_native:
	rdmsr
	ret
.Lxenmsr_rdmsr_hit:
	movzbl {kinds}(%rdx,%rax), %eax
	test %eax, %eax
	jz .Lxenmsr_rdmsr_policy
	cmp $1, %eax
	jne .Lxenmsr_rdmsr_gs
.Lxenmsr_rdmsr_fs:
	rdfsbase %rax
	mov %rax, %rdx
	shr $32, %rdx
	mov %eax, %eax
	ret
.Lxenmsr_rdmsr_gs:
	rdgsbase %rax
	mov %rax, %rdx
	shr $32, %rdx
	mov %eax, %eax
	ret
.Lxenmsr_rdmsr_policy:
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
	jc .Lxenmsr_rdmsr_slow
	mov %edx, %eax
	shr $32, %rdx
	ret
.Lxenmsr_rdmsr_slow:
	cmp ${neg_native}, %rax
	je .Lxenmsr_rdmsr_native
	neg %rax
	push %rax
	.cfi_adjust_cfa_offset 8
.Lxenmsr_rdmsr_trap:
	ud2
	.cfi_endproc
	.size xenmsr_stub_rdmsr, . - xenmsr_stub_rdmsr

	.pushsection xenmsr_extable,"awR",@progbits
	.balign 4
	.long .Lxenmsr_rdmsr_native - .
	.long .Lxenmsr_rdmsr_native - .
	.long {rewind_native}
	.long .Lxenmsr_rdmsr_fs - .
	.long .Lxenmsr_rdmsr_fs - .
	.long {rewind_native}
	.long .Lxenmsr_rdmsr_gs - .
	.long .Lxenmsr_rdmsr_gs - .
	.long {rewind_native}
	.long .Lxenmsr_rdmsr_trap - .
	.long .Lxenmsr_rdmsr_trap - .
	.long {rewind_error}
	.popsection
	.popsection
