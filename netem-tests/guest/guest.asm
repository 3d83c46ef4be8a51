; Ferry test guest: a tiny 32-bit protected-mode multiboot (v1) kernel.
;
; Build:  nasm -f bin -o guest.bin guest.asm
; Run:    qemu-system-x86_64 -accel tcg -machine pc -m 64 -nodefaults -display none \
;             -serial stdio -kernel guest.bin -append "dirty=100 verify=10"
;         (add `-serial unix:hb.sock,server=on,wait=off` for the COM2 heartbeat)
;
; It uses the multiboot "a.out kludge" (header flag bit 16), so the flat binary
; produced by `nasm -f bin` is loadable with QEMU's -kernel without a linker.
;
; What it does (see netem-tests/guest/README.md for the protocol):
;   * prints `ferry-guest ...` (configuration) and `ready` on COM1 (0x3f8);
;   * every `tick=` jiffies of guest time (PIT IRQ0 at 100 Hz, 10 ms per jiffy;
;     default 10 = 100 ms, minimum 1) increments a tick counter kept in RAM and
;     prints `tick N` on COM1, and the same line on COM2 (0x2f8) as a heartbeat
;     for host-side downtime measurements. COM2 is optional: an absent port
;     reads 0xFF (transmitter always "empty"), and a full one is waited on for a
;     bounded time only, after which the line is dropped (see com2_tick);
;   * memory layout (all sizes configurable via the multiboot command line):
;       0x00100000  kernel image (code + constant data only)
;       0x00110000  variables (own page, so TCG does not see self-modifying code)
;       0x00111000  IDT
;       0x00140000  stack top (grows down)
;       0x00140000  seed table: one dword per random page (max 196608 pages)
;       0x00200000  dup region:  dup= MiB of pages filled with 4 repeating patterns
;       ...         rand region: rand= MiB of self-describing pseudo-random pages
;       ...         zero region: zero= MiB left zero (checked by verify)
;       rest        untouched (zero)
;   * after each tick it rewrites `dirty=` random pages of the rand region with
;     fresh xorshift content (the dirty-rate knob: pages per tick);
;   * every `verify=` ticks (0 = never) it checks the whole layout and prints
;     `verify ok tick=N sum=XXXXXXXX` or `verify FAIL <region> page=N tick=N`.
;     `sum` is a hash of all random-page seeds, so with dirty=0 it is constant
;     and must be identical before and after a migration.
;   * serial input commands (one per line): `dN` sets the dirty rate to N pages
;     per tick, `v` runs a verify pass at the next tick.
;   * `retouch=1` (default 0) works around QEMU TCG before 9.0 (fixed upstream
;     by 03bfc2188f "physmem: Fix migration dirty bitmap coherency with TCG
;     memory access"): a dirty-bitmap sync does not re-arm TCG's write
;     tracking for pages in the TLB, so a page written again after the second
;     sync is never sent again and the destination resumes with a stale copy.
;     With it, after writing a page the guest drops that page's TLB entry
;     (invlpg) and rewrites one dword of it with the same value (`or [m], 0`),
;     which TCG then records as a write: see RETOUCH.
;
; Random page i (4 KiB) content: dword0 = seed, dword1 = i, dwords 2..1023 =
; xorshift32 stream starting from seed * 0x9E3779B1. The seed is also stored in the seed
; table (a different page), so a stale or lost page after migration is caught.

bits 32

; One xorshift32 step on eax (clobbers ebx): the generator behind the global rng, the page
; content streams and their verification, which must all agree.
%macro XORSHIFT32 0
    mov ebx, eax
    shl ebx, 13
    xor eax, ebx
    mov ebx, eax
    shr ebx, 17
    xor eax, ebx
    mov ebx, eax
    shl ebx, 5
    xor eax, ebx
%endmacro

; RETOUCH mem: if retouch=1, make TCG see a write to mem's page again (see the
; header). `or` is one instruction, so an interrupt cannot slip in between its
; read and write. Flags are clobbered.
%macro RETOUCH 1
    cmp dword [v_retouch], 0
    je %%skip
    invlpg %1
    or dword %1, 0
%%skip:
%endmacro

LOAD_ADDR      equ 0x00100000
VARS           equ 0x00110000
IDT            equ 0x00111000
STACK_TOP      equ 0x00140000
SEED_TABLE     equ 0x00140000
MAX_RAND_PAGES equ (0x00200000 - SEED_TABLE) / 4
DUP_BASE       equ 0x00200000

; variables (dword each)
v_mbi          equ VARS + 0x00
v_jiffies      equ VARS + 0x04
v_last_j       equ VARS + 0x08
v_tick         equ VARS + 0x0c
v_dirty        equ VARS + 0x10
v_verify       equ VARS + 0x14
v_dup_pages    equ VARS + 0x18
v_rand_pages   equ VARS + 0x1c
v_zero_pages   equ VARS + 0x20
v_rand_base    equ VARS + 0x24
v_zero_base    equ VARS + 0x28
v_rng          equ VARS + 0x2c
v_mem_end      equ VARS + 0x30
v_cmd          equ VARS + 0x34
v_acc          equ VARS + 0x38
v_verify_req   equ VARS + 0x3c
v_dup_mib      equ VARS + 0x40
v_rand_mib     equ VARS + 0x44
v_zero_mib     equ VARS + 0x48
v_seed         equ VARS + 0x4c
v_tick_len     equ VARS + 0x50
v_retouch      equ VARS + 0x54

; Polls of COM2's line status before a heartbeat line is dropped (a connected but
; unread chardev must not stall the guest).
COM2_SPIN      equ 20000

COM1           equ 0x3f8
COM2           equ 0x2f8

MB_MAGIC       equ 0x1BADB002
MB_FLAGS       equ 0x00010002          ; bit 1: memory info, bit 16: a.out kludge

org LOAD_ADDR

mb_header:
    dd MB_MAGIC
    dd MB_FLAGS
    dd -(MB_MAGIC + MB_FLAGS)
    dd mb_header                       ; header_addr
    dd LOAD_ADDR                       ; load_addr
    dd 0                               ; load_end_addr: whole file
    dd 0x00200000                      ; bss_end_addr: keep QEMU's multiboot info above our tables
    dd start                           ; entry_addr

align 8
gdt:
    dq 0
    dq 0x00CF9A000000FFFF              ; 0x08: code, flat 4 GiB
    dq 0x00CF92000000FFFF              ; 0x10: data, flat 4 GiB
gdt_end:
gdt_desc:
    dw gdt_end - gdt - 1
    dd gdt
idt_desc:
    dw 256 * 8 - 1
    dd IDT

patterns:
    dd 0x11111111, 0xDEADBEEF, 0xA5A5A5A5, 0x0F1E2D3C

s_banner:   db "ferry-guest v1", 0
s_mem:      db " mem_kib=", 0
s_dup:      db " dup_pages=", 0
s_rand:     db " rand_pages=", 0
s_zero:     db " zero_pages=", 0
s_dirty:    db " dirty=", 0
s_verify:   db " verify=", 0
s_ticklen:  db " tick=", 0
s_ready:    db "ready", 10, 0
s_tick:     db "tick ", 0
s_vok:      db "verify ok tick=", 0
s_sum:      db " sum=", 0
s_vfail:    db "verify FAIL ", 0
s_rdup:     db "dup", 0
s_rrand:    db "rand", 0
s_rzero:    db "zero", 0
s_page:     db " page=", 0
s_tick2:    db " tick=", 0
s_dirtyset: db "dirty set ", 0
s_cfgerr:   db "error: regions exceed guest RAM", 10, 0
s_exc:      db "panic: cpu exception ", 0
k_dirty:    db "dirty=", 0
k_verify:   db "verify=", 0
k_dup:      db "dup=", 0
k_rand:     db "rand=", 0
k_zero:     db "zero=", 0
k_seed:     db "seed=", 0
k_tick:     db "tick=", 0
k_retouch:  db "retouch=", 0

; ---------------------------------------------------------------------------
start:
    cli
    mov esp, STACK_TOP
    mov [v_mbi], ebx
    lgdt [gdt_desc]
    jmp 0x08:.reload
.reload:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    mov ss, ax
    cld

    ; defaults
    mov dword [v_dirty], 64
    mov dword [v_verify], 10
    mov dword [v_dup_mib], 4
    mov dword [v_rand_mib], 8
    mov dword [v_zero_mib], 4
    mov dword [v_seed], 0x2545F491
    mov dword [v_tick_len], 10

    call serial_init
    call parse_mbi
    call layout
    call print_config
    call init_regions
    call idt_init
    call pic_init
    call pit_init

    mov esi, s_ready
    call puts
    mov eax, [v_jiffies]
    mov [v_last_j], eax
    sti

main_loop:
    ; Everything the main loop wrote (variables, its stack) since the last hlt.
    RETOUCH [VARS]
    RETOUCH [esp - 4]
    hlt
    call serial_poll
    mov eax, [v_jiffies]
    sub eax, [v_last_j]
    cmp eax, [v_tick_len]
    jb main_loop
    mov eax, [v_jiffies]
    mov [v_last_j], eax

    inc dword [v_tick]
    mov esi, s_tick
    call puts
    mov eax, [v_tick]
    call put_dec
    mov al, 10
    call putc
    call com2_tick

    call dirty_pages

    cmp dword [v_verify_req], 0
    jne .do_verify
    mov ecx, [v_verify]
    test ecx, ecx
    jz main_loop
    mov eax, [v_tick]
    xor edx, edx
    div ecx
    test edx, edx
    jnz main_loop
.do_verify:
    mov dword [v_verify_req], 0
    call verify
    jmp main_loop

; ---------------------------------------------------------------------------
; serial
serial_init:
    mov bx, COM1
    call uart_init
    mov bx, COM2
    ; fall through: COM2 is set up like COM1 (harmless if there is no COM2)

; bx = UART base port
uart_init:
    lea dx, [bx + 1]
    xor al, al
    out dx, al                         ; no UART interrupts
    lea dx, [bx + 3]
    mov al, 0x80
    out dx, al                         ; DLAB
    mov dx, bx
    mov al, 1
    out dx, al                         ; 115200 baud
    lea dx, [bx + 1]
    xor al, al
    out dx, al
    lea dx, [bx + 3]
    mov al, 0x03
    out dx, al                         ; 8N1
    lea dx, [bx + 2]
    mov al, 0xC7
    out dx, al                         ; FIFO on, cleared
    lea dx, [bx + 4]
    mov al, 0x03
    out dx, al                         ; DTR, RTS
    ret

; al = char
putc:
    push edx
    push eax
    mov dx, COM1 + 5
.wait:
    in al, dx
    test al, 0x20
    jz .wait
    pop eax
    mov dx, COM1
    out dx, al
    pop edx
    ret

; Writes `tick N` (N = [v_tick]) and a newline to COM2: the heartbeat. The line
; (at most 16 bytes) goes whole into the UART's 16-byte transmit FIFO once that is
; empty (LSR bit 5), or is dropped whole if it does not drain within COM2_SPIN
; polls: a slow or stuck reader costs lines, never a stalled guest. Without a
; COM2 the status port reads 0xFF (always "empty") and the writes go nowhere.
com2_tick:
    pushad
    mov dx, COM2 + 5
    mov ecx, COM2_SPIN
.wait:
    in al, dx
    test al, 0x20
    jnz .send
    dec ecx
    jnz .wait
    jmp .done                          ; transmitter stuck: drop this line
.send:
    mov dx, COM2
    mov esi, s_tick
.s:
    lodsb
    test al, al
    jz .num
    out dx, al
    jmp .s
.num:
    mov eax, [v_tick]
    mov ebx, 10
    xor ecx, ecx
.div:
    xor edx, edx
    div ebx
    push edx                           ; digits, least significant first
    inc ecx
    test eax, eax
    jnz .div
    mov dx, COM2
.out:
    pop eax
    add al, '0'
    out dx, al
    loop .out
    mov al, 10
    out dx, al
.done:
    popad
    ret

; esi = NUL-terminated string
puts:
    push eax
    push esi
.l:
    lodsb
    test al, al
    jz .done
    call putc
    jmp .l
.done:
    pop esi
    pop eax
    ret

; eax = value, printed in decimal
put_dec:
    pushad
    mov ebx, 10
    xor ecx, ecx
.div:
    xor edx, edx
    div ebx
    push edx
    inc ecx
    test eax, eax
    jnz .div
.out:
    pop eax
    add al, '0'
    call putc
    loop .out
    popad
    ret

; eax = value, printed as 8 hex digits
put_hex:
    pushad
    mov ecx, 8
    mov edx, eax
.l:
    rol edx, 4
    mov eax, edx
    and eax, 0xF
    cmp al, 10
    jb .digit
    add al, 'a' - 10
    jmp .emit
.digit:
    add al, '0'
.emit:
    call putc
    loop .l
    popad
    ret

; Poll COM1 for input characters and run line commands (`dN`, `v`).
serial_poll:
    pushad
.next:
    mov dx, COM1 + 5
    in al, dx
    test al, 1
    jz .done
    mov dx, COM1
    in al, dx
    cmp al, '0'
    jb .notdigit
    cmp al, '9'
    ja .notdigit
    movzx ebx, al
    sub ebx, '0'
    mov eax, [v_acc]
    imul eax, eax, 10
    add eax, ebx
    mov [v_acc], eax
    jmp .next
.notdigit:
    cmp al, 10
    je .eol
    cmp al, 13
    je .eol
    cmp al, ' '
    je .next
    movzx eax, al
    mov [v_cmd], eax
    mov dword [v_acc], 0
    jmp .next
.eol:
    mov eax, [v_cmd]
    cmp eax, 'd'
    jne .notd
    mov eax, [v_acc]
    mov [v_dirty], eax
    mov esi, s_dirtyset
    call puts
    call put_dec
    mov al, 10
    call putc
    jmp .reset
.notd:
    cmp eax, 'v'
    jne .reset
    mov dword [v_verify_req], 1
.reset:
    mov dword [v_cmd], 0
    mov dword [v_acc], 0
    jmp .next
.done:
    popad
    ret

; ---------------------------------------------------------------------------
; multiboot info + command line
parse_mbi:
    mov ebx, [v_mbi]
    mov eax, [ebx]                     ; flags
    test eax, 1
    jz .nomem
    mov ecx, [ebx + 8]                 ; mem_upper (KiB above 1 MiB)
    shl ecx, 10
    add ecx, 0x00100000
    mov [v_mem_end], ecx
    jmp .cmd
.nomem:
    mov dword [v_mem_end], 0x01000000  ; assume 16 MiB
.cmd:
    test eax, 4
    jz .ret
    mov esi, [ebx + 16]                ; cmdline
.token:
    ; skip spaces
    mov al, [esi]
    test al, al
    jz .ret
    cmp al, ' '
    jne .match
    inc esi
    jmp .token
.match:
    mov edi, k_dirty
    mov ebx, v_dirty
    call match_key
    jnc .token
    mov edi, k_verify
    mov ebx, v_verify
    call match_key
    jnc .token
    mov edi, k_dup
    mov ebx, v_dup_mib
    call match_key
    jnc .token
    mov edi, k_rand
    mov ebx, v_rand_mib
    call match_key
    jnc .token
    mov edi, k_zero
    mov ebx, v_zero_mib
    call match_key
    jnc .token
    mov edi, k_seed
    mov ebx, v_seed
    call match_key
    jnc .token
    mov edi, k_tick
    mov ebx, v_tick_len
    call match_key
    jnc .token
    mov edi, k_retouch
    mov ebx, v_retouch
    call match_key
    jnc .token
    ; unknown token: skip to next space
.skip:
    mov al, [esi]
    test al, al
    jz .ret
    cmp al, ' '
    je .token
    inc esi
    jmp .skip
.ret:
    ret

; esi = token, edi = key ("name="), ebx = destination variable.
; On match: parse decimal into [ebx], advance esi past it, CF=0. Else CF=1, esi unchanged.
match_key:
    push esi
.cmp:
    mov al, [edi]
    test al, al
    jz .matched
    cmp al, [esi]
    jne .nomatch
    inc esi
    inc edi
    jmp .cmp
.nomatch:
    pop esi
    stc
    ret
.matched:
    add esp, 4
    xor eax, eax
.digit:
    movzx ecx, byte [esi]
    sub ecx, '0'
    cmp ecx, 9
    ja .end
    imul eax, eax, 10
    add eax, ecx
    inc esi
    jmp .digit
.end:
    mov [ebx], eax
    clc
    ret

; compute region bases; halt with an error if they do not fit
layout:
    mov eax, [v_dup_mib]
    shl eax, 8
    mov [v_dup_pages], eax
    shl eax, 12
    add eax, DUP_BASE
    mov [v_rand_base], eax
    mov ecx, [v_rand_mib]
    shl ecx, 8
    cmp ecx, MAX_RAND_PAGES
    ja .err
    mov [v_rand_pages], ecx
    shl ecx, 12
    add eax, ecx
    mov [v_zero_base], eax
    mov ecx, [v_zero_mib]
    shl ecx, 8
    mov [v_zero_pages], ecx
    shl ecx, 12
    add eax, ecx
    jc .err
    cmp eax, [v_mem_end]
    ja .err
    mov eax, [v_seed]
    or eax, 1
    mov [v_rng], eax
    cmp dword [v_tick_len], 1          ; tick=0 means 1 jiffy
    jae .ticklen_ok
    mov dword [v_tick_len], 1
.ticklen_ok:
    ret
.err:
    mov esi, s_cfgerr
    call puts
.halt:
    cli
    hlt
    jmp .halt

print_config:
    mov esi, s_banner
    call puts
    mov esi, s_mem
    call puts
    mov eax, [v_mem_end]
    shr eax, 10
    call put_dec
    mov esi, s_dup
    call puts
    mov eax, [v_dup_pages]
    call put_dec
    mov esi, s_rand
    call puts
    mov eax, [v_rand_pages]
    call put_dec
    mov esi, s_zero
    call puts
    mov eax, [v_zero_pages]
    call put_dec
    mov esi, s_dirty
    call puts
    mov eax, [v_dirty]
    call put_dec
    mov esi, s_verify
    call puts
    mov eax, [v_verify]
    call put_dec
    mov esi, s_ticklen
    call puts
    mov eax, [v_tick_len]
    call put_dec
    mov al, 10
    call putc
    ret

; ---------------------------------------------------------------------------
; memory content

; returns next xorshift32 value of the global generator in eax
rng_next:
    push ebx
    mov eax, [v_rng]
    XORSHIFT32
    mov [v_rng], eax
    pop ebx
    ret

; eax = page index, edx = seed (non-zero). Rewrites one random page.
write_rand_page:
    pushad
    mov [SEED_TABLE + eax * 4], edx
    mov ebx, eax
    shl eax, 12
    add eax, [v_rand_base]
    mov edi, eax
    mov [edi], edx
    mov [edi + 4], ebx
    add edi, 8
    mov ecx, 1022
    ; Start the stream from a multiplied seed: seeds are consecutive outputs of the same
    ; xorshift, so streaming from the seed itself would make each page its neighbour shifted
    ; by one dword, which any compressor folds away.
    imul eax, edx, 0x9E3779B1
.l:
    XORSHIFT32
    stosd
    dec ecx
    jnz .l
    RETOUCH [edi - 4]                  ; the page
    mov ebx, [edi - 4096 + 4]          ; its index (XORSHIFT32 clobbered ebx)
    RETOUCH [SEED_TABLE + ebx * 4]     ; its seed table entry
    popad
    ret

init_regions:
    ; dup region: page i filled with patterns[i & 3]
    mov edi, DUP_BASE
    xor edx, edx
.dup:
    cmp edx, [v_dup_pages]
    jae .rand
    mov eax, edx
    and eax, 3
    mov eax, [patterns + eax * 4]
    mov ecx, 1024
    rep stosd
    inc edx
    jmp .dup
.rand:
    xor ebx, ebx
.rl:
    cmp ebx, [v_rand_pages]
    jae .done
    call rng_next
    mov edx, eax
    mov eax, ebx
    call write_rand_page
    inc ebx
    jmp .rl
.done:
    ret

; rewrite [v_dirty] randomly chosen random pages
dirty_pages:
    mov ecx, [v_dirty]
    test ecx, ecx
    jz .ret
    mov ebx, [v_rand_pages]
    test ebx, ebx
    jz .ret
.l:
    push ecx
    call rng_next
    xor edx, edx
    div ebx                            ; edx = page index
    push edx
    call rng_next
    mov edx, eax                       ; seed
    pop eax
    call write_rand_page
    pop ecx
    dec ecx
    jnz .l
.ret:
    ret

; Check every region; print the result.
verify:
    pushad
    ; dup region
    mov edi, DUP_BASE
    xor edx, edx
.dup:
    cmp edx, [v_dup_pages]
    jae .rand
    mov eax, edx
    and eax, 3
    mov eax, [patterns + eax * 4]
    mov ecx, 1024
    repe scasd
    jne .fail_dup
    inc edx
    jmp .dup
.rand:
    xor ebp, ebp                       ; sum
    xor edx, edx                       ; page index
    mov esi, [v_rand_base]
.rl:
    cmp edx, [v_rand_pages]
    jae .zero
    mov eax, [SEED_TABLE + edx * 4]
    cmp eax, [esi]
    jne .fail_rand
    cmp edx, [esi + 4]
    jne .fail_rand
    ; sum = (sum ^ seed) * 16777619
    xor ebp, eax
    imul ebp, ebp, 16777619
    lea edi, [esi + 8]
    mov ecx, 1022
    imul eax, eax, 0x9E3779B1          ; same stream start as write_rand_page
.gen:
    XORSHIFT32
    cmp eax, [edi]
    jne .fail_rand
    add edi, 4
    dec ecx
    jnz .gen
    add esi, 4096
    inc edx
    jmp .rl
.zero:
    mov edi, [v_zero_base]
    xor edx, edx
    xor eax, eax
.zl:
    cmp edx, [v_zero_pages]
    jae .ok
    mov ecx, 1024
    repe scasd
    jne .fail_zero
    inc edx
    jmp .zl
.ok:
    mov esi, s_vok
    call puts
    mov eax, [v_tick]
    call put_dec
    mov esi, s_sum
    call puts
    mov eax, ebp
    call put_hex
    mov al, 10
    call putc
    popad
    ret
.fail_dup:
    mov esi, s_rdup
    jmp .fail
.fail_rand:
    mov esi, s_rrand
    jmp .fail
.fail_zero:
    mov esi, s_rzero
.fail:
    push esi
    mov esi, s_vfail
    call puts
    pop esi
    call puts
    mov esi, s_page
    call puts
    mov eax, edx
    call put_dec
    mov esi, s_tick2
    call puts
    mov eax, [v_tick]
    call put_dec
    mov al, 10
    call putc
    popad
    ret

; ---------------------------------------------------------------------------
; interrupts

; edi = IDT entry address, eax = handler
set_gate:
    mov [edi], ax
    mov word [edi + 2], 0x08
    mov word [edi + 4], 0x8E00         ; present, ring 0, 32-bit interrupt gate
    shr eax, 16
    mov [edi + 6], ax
    ret

idt_init:
    mov edi, IDT
    xor ecx, ecx
.l:
    cmp ecx, 32
    jb .exc
    cmp ecx, 32
    je .timer
    cmp ecx, 48
    jb .irq
    mov eax, isr_ignore
    jmp .set
.exc:
    mov eax, isr_exception
    jmp .set
.timer:
    mov eax, isr_timer
    jmp .set
.irq:
    mov eax, isr_irq
.set:
    push ecx
    call set_gate
    pop ecx
    add edi, 8
    inc ecx
    cmp ecx, 256
    jb .l
    lidt [idt_desc]
    ret

pic_init:
    mov al, 0x11
    out 0x20, al
    out 0xA0, al
    mov al, 0x20
    out 0x21, al                       ; master vectors 0x20..0x27
    mov al, 0x28
    out 0xA1, al                       ; slave vectors 0x28..0x2f
    mov al, 0x04
    out 0x21, al
    mov al, 0x02
    out 0xA1, al
    mov al, 0x01
    out 0x21, al
    out 0xA1, al
    mov al, 0xFE
    out 0x21, al                       ; only IRQ0 (PIT)
    mov al, 0xFF
    out 0xA1, al
    ret

pit_init:
    mov al, 0x34                       ; channel 0, lo/hi, mode 2
    out 0x43, al
    mov ax, 11932                      ; 1193182 Hz / 11932 = 100 Hz
    out 0x40, al
    mov al, ah
    out 0x40, al
    ret

isr_timer:
    push eax
    inc dword [v_jiffies]
    RETOUCH [v_jiffies]
    mov al, 0x20
    out 0x20, al
    pop eax
    iret

isr_irq:
    push eax
    mov al, 0x20
    out 0xA0, al
    out 0x20, al
    pop eax
    iret

isr_ignore:
    iret

isr_exception:
    mov esi, s_exc
    call puts
    mov eax, [esp]
    call put_hex
    mov al, 10
    call putc
.halt:
    cli
    hlt
    jmp .halt
