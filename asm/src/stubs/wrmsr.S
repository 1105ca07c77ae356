/*
 * xenmsr_stub_wrmsr: WRMSR (and WRMSRNS) with the native register contract.
 *
 *   in:        ecx = MSR index, edx:eax = value (upper halves of rax and rdx ignored)
 *   out:       nothing
 *   preserved: every GPR and rsp
 *   clobbered: flags
 *   stack:     16-byte aligned at the site's `call` (every Rust `asm!` block without
 *              `nostack` guarantees it), so rsp = 8 (mod 16) here
 *
 * Entered only by the 5-byte `call` of a site that has its own extable entry.
 *
 * Segment bases, no Rust. FS_BASE, GS_BASE and KERNEL_GS_BASE (0xc0000100-102):
 *  - with FSGSBASE enabled (`xenmsr_fsgsbase_enabled`, set by `init` after CR4.FSGSBASE),
 *    FS_BASE and GS_BASE are written with WRFSBASE/WRGSBASE. A non-canonical value, which
 *    would #GP there, is refused before the instruction with the error a #GP gives
 *    (Fault 13) through the ud2 below, so the caller sees what a faulting WRFSBASE at its
 *    own site gives on hardware (QEMU's TCG does not raise that #GP; the check makes the
 *    result the same everywhere). Canonical means 48-bit: a PV guest has 4-level paging.
 *    A #UD (were CR4.FSGSBASE off on this CPU) is reported at the caller's site too: the
 *    instruction's REWIND entry skips the one word above the return address, the caller's
 *    rax, and restores rax from it.
 *  - otherwise, and always for KERNEL_GS_BASE (a PV kernel cannot reach the user GS base
 *    with an instruction), once `init` has stored the hypercall page's set_segment_base
 *    entry (`xenmsr_segbase_entry`): HYPERVISOR_set_segment_base(which, edx:eax) through
 *    that entry, called directly. which = 0 (FS), 2 (GS_KERNEL), 1 (GS_USER) for the MSR's
 *    low byte 0, 1, 2: (4 >> cl) & 3. The entry clobbers rax and the argument registers
 *    the hypercall uses (rdi, rsi: a debug Xen overwrites them), which are saved. A failure
 *    is MsrError::Hypercall(errno) through the ud2.
 *  - before that, the policy path below.
 *
 * Everything else: the policy path. 9 pushes keep the stack aligned for the call of
 * `xenmsr_handle_write(msr: u32, lo: u32, hi: u32) -> RawOutcome` (C ABI: edi, esi, edx;
 * hi is already in edx):
 *   status 0: done;
 *   status 1: restore everything and execute the real WRMSR (REWIND entry, skip 0);
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
	cmp ${fs_base}, %ecx
	jb .Lxenmsr_wrmsr_policy
	cmp ${gs_base}, %ecx
	ja .Lxenmsr_wrmsr_kernel_gs
	cmpb $0, {fsgsbase}(%rip)
	je .Lxenmsr_wrmsr_hypercall_if_ready
	.cfi_remember_state
	push %rax
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rax, 0
	push %rax
	.cfi_adjust_cfa_offset 8
	mov %edx, 4(%rsp)
	/* Canonical (48-bit) exactly when bits 63..47, edx's bits 31..15, are all equal. */
	movswl %dx, %eax
	cmp %eax, %edx
	jne .Lxenmsr_wrmsr_noncanonical
	pop %rax
	.cfi_adjust_cfa_offset -8
	cmp ${fs_base}, %ecx
	jne .Lxenmsr_wrmsr_wrgs
.Lxenmsr_wrmsr_wrfs:
	wrfsbase %rax
	.cfi_remember_state
	pop %rax
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rax
	ret
	.cfi_restore_state
.Lxenmsr_wrmsr_wrgs:
	wrgsbase %rax
	pop %rax
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rax
	ret
	.cfi_restore_state
	.cfi_remember_state
.Lxenmsr_wrmsr_noncanonical:
	/* Entered with the value, the caller's rax and the return address on the stack. */
	.cfi_adjust_cfa_offset 16
	.cfi_rel_offset %rax, 8
	add $8, %rsp
	.cfi_adjust_cfa_offset -8
	movabs ${fault_gp}, %rax
	xchg %rax, (%rsp)
	.cfi_restore %rax
	jmp .Lxenmsr_wrmsr_trap
	.cfi_restore_state
.Lxenmsr_wrmsr_kernel_gs:
	cmp ${kernel_gs_base}, %ecx
	jne .Lxenmsr_wrmsr_policy
.Lxenmsr_wrmsr_hypercall_if_ready:
	cmpq $0, {segbase_entry}(%rip)
	je .Lxenmsr_wrmsr_policy
	push %rax
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rax, 0
	push %rdi
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rdi, 0
	push %rsi
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rsi, 0
	mov %edx, %esi
	shl $32, %rsi
	mov %eax, %eax
	or %rax, %rsi
	/* which: (4 >> cl) & 3 maps the MSR's low byte 0, 1, 2 to 0 (FS), 2 (GS_KERNEL), 1 (GS_USER).
	 * The call and its error path repeat segbase.S's common tail on purpose: jumping there
	 * would first have to build the value in rax, two instructions more on every write. */
	mov $4, %edi
	shr %cl, %edi
	and $3, %edi
	call *{segbase_entry}(%rip)
	test %rax, %rax
	jnz .Lxenmsr_wrmsr_hcfail
	.cfi_remember_state
	pop %rsi
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rsi
	pop %rdi
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rdi
	pop %rax
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rax
	ret
	.cfi_restore_state
.Lxenmsr_wrmsr_hcfail:
	neg %rax
	shl $32, %rax
	or ${class_hypercall}, %rax
	pop %rsi
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rsi
	pop %rdi
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rdi
	xchg %rax, (%rsp)
	.cfi_restore %rax
	jmp .Lxenmsr_wrmsr_trap
.Lxenmsr_wrmsr_policy:
	/* (the entry's state: nothing above the return address) */
	.cfi_def_cfa %rsp, 8
	.cfi_restore %rax
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
	mov %ecx, %edi
	mov %eax, %esi
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
	pop %rdx
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rdx
	pop %rcx
	.cfi_adjust_cfa_offset -8
	.cfi_restore %rcx
	jc .Lxenmsr_wrmsr_slow
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
	.long .Lxenmsr_wrmsr_wrfs - .
	.long .Lxenmsr_wrmsr_wrfs - .
	.long {rewind_restore_rax}
	.long .Lxenmsr_wrmsr_wrgs - .
	.long .Lxenmsr_wrmsr_wrgs - .
	.long {rewind_restore_rax}
	.long .Lxenmsr_wrmsr_trap - .
	.long .Lxenmsr_wrmsr_trap - .
	.long {rewind_error}
	.popsection
	.popsection
