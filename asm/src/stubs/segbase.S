/*
 * xenmsr_stub_segbase_fs, _gs_kernel, _gs_user: the Xen PV variant of a constant-index
 * write site whose MSR is FS_BASE, GS_BASE or KERNEL_GS_BASE, when the route is the
 * hypercall (FSGSBASE off, or always for KERNEL_GS_BASE). The index is known when the
 * site is patched, so the route is too: the stub makes the one hypercall the policy would
 * make, HYPERVISOR_set_segment_base(which, value), with no Rust and no dispatch.
 *
 *   in:        rax = the full 64-bit base (a constant-index write site's value register;
 *              ecx = the MSR and edx = the high half are not used)
 *   out:       nothing
 *   preserved: every GPR and rsp
 *   clobbered: flags
 *
 * Entered only by the `call` that starts a 9-byte constant-index write site, which has
 * its own extable entry. The hypercall goes straight through the page entry for
 * set_segment_base that `xenmsr_segbase_entry` holds (stored by `init` before any site is
 * patched to these stubs). A hypercall page entry preserves everything but rax and the
 * argument registers the hypercall uses (rdi and rsi here; a debug Xen overwrites them;
 * the mock page does too), which are saved. No Rust is called, so the stack's alignment
 * does not matter.
 *
 *   result 0:  restore everything and return;
 *   -errno:    encode MsrError::Hypercall(errno) (class 3 in the low byte, errno << 32),
 *              restore everything, leave the code just above the return address, and trap
 *              at ud2 (REWIND entry, skip 1, carries error): the caller's write-safe or
 *              write entry then runs exactly as for the generic stub.
 *
 * The caller's rax is saved first, so that after rdi and rsi are popped it is the word
 * above the return address, where `xchg` swaps the error code in.
 */
	.pushsection .text.xenmsr_stub_segbase,"ax",@progbits
	.balign 16
	.globl xenmsr_stub_segbase_fs
	.hidden xenmsr_stub_segbase_fs
	.type xenmsr_stub_segbase_fs,@function
xenmsr_stub_segbase_fs:
	.cfi_startproc
	push %rax
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rax, 0
	push %rdi
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rdi, 0
	mov ${segbase_fs}, %edi
	jmp .Lxenmsr_segbase_common
	.cfi_endproc
	.size xenmsr_stub_segbase_fs, . - xenmsr_stub_segbase_fs

	.balign 16
	.globl xenmsr_stub_segbase_gs_kernel
	.hidden xenmsr_stub_segbase_gs_kernel
	.type xenmsr_stub_segbase_gs_kernel,@function
xenmsr_stub_segbase_gs_kernel:
	.cfi_startproc
	push %rax
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rax, 0
	push %rdi
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rdi, 0
	mov ${segbase_gs_kernel}, %edi
	jmp .Lxenmsr_segbase_common
	.cfi_endproc
	.size xenmsr_stub_segbase_gs_kernel, . - xenmsr_stub_segbase_gs_kernel

	.balign 16
	.globl xenmsr_stub_segbase_gs_user
	.hidden xenmsr_stub_segbase_gs_user
	.type xenmsr_stub_segbase_gs_user,@function
xenmsr_stub_segbase_gs_user:
	.cfi_startproc
	push %rax
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rax, 0
	push %rdi
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rdi, 0
	mov ${segbase_gs_user}, %edi
	/* fall through */
	.cfi_endproc
	.size xenmsr_stub_segbase_gs_user, . - xenmsr_stub_segbase_gs_user

	.hidden xenmsr_stub_segbase_common
	.type xenmsr_stub_segbase_common,@function
xenmsr_stub_segbase_common:
.Lxenmsr_segbase_common:
	/* Entered from an entry point above with its return address, rax and rdi pushed. */
	.cfi_startproc
	.cfi_adjust_cfa_offset 16
	.cfi_offset %rax, -16
	.cfi_offset %rdi, -24
	push %rsi
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset %rsi, 0
	mov %rax, %rsi
	call *{segbase_entry}(%rip)
	test %rax, %rax
	jnz .Lxenmsr_segbase_fail
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
.Lxenmsr_segbase_fail:
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
	/* rax is the caller's again; its slot holds the error code. */
	.cfi_restore %rax
.Lxenmsr_segbase_trap:
	ud2
	.cfi_endproc
	.size xenmsr_stub_segbase_common, . - xenmsr_stub_segbase_common

	.pushsection xenmsr_extable,"awR",@progbits
	.balign 4
	.long .Lxenmsr_segbase_trap - .
	.long .Lxenmsr_segbase_trap - .
	.long {rewind_error}
	.popsection
	.popsection
