//! Generations: passes of random 4 KiB writes on one disk, each pass with its own
//! pattern (the generation number in the seed), remembering which generation each block
//! holds; at the end every block ever written is read back and checked against its latest
//! generation. Made for a host that mirrors and pivots the disk while this runs.
//!
//! Command line: `gens=N` (passes; 0 or absent: none), `gen_writes=K` (writes per pass,
//! 32), `gen_span_mib=S` (the blocks written lie in sectors 8 .. 8 + S MiB, 16; block 0
//! is left to the pattern checks). Output: `disk<i>.gen=<g>` after each pass, then
//! `disk<i>.gens_verify=ok|fail`, `disk<i>.gens_blocks=<blocks written>`,
//! `disk<i>.gens_digest=<hex>`: FNV-1a over (block, generation) of every written block in
//! block order, as 8 little-endian bytes each, which a host recomputes from the image.

use crate::say;
use crate::virtio::{BLOCK, Disk};

/// Most blocks tracked (64 MiB of 4 KiB blocks).
const MAX_BLOCKS: usize = 16384;

/// The generation each block holds (0: never written by this phase).
static mut GEN: [u16; MAX_BLOCKS] = [0; MAX_BLOCKS];
/// The pass that picked each block last (no block twice in one pass).
static mut PICKED: [u16; MAX_BLOCKS] = [0; MAX_BLOCKS];

/// The seed of generation `g`'s pattern.
pub fn gen_seed(seed: u64, g: u64) -> u64 {
    seed ^ (g << 32) ^ 0x6E65_6E73
}

/// Runs `gens` passes of `writes` random block writes within `span_blocks` blocks of
/// `d` (disk number `i`); returns whether every write and the final check succeeded.
pub fn run(
    d: &mut Disk,
    i: usize,
    (gens, writes, span_blocks): (u64, u64, u64),
    seed: u64,
    rng: &mut u64,
    timeout: u64,
) -> bool {
    let blocks = span_blocks.min(MAX_BLOCKS as u64).min(d.capacity / 8 - 1).max(1);
    let words = (BLOCK / 8) as u64;
    let per = (BLOCK / 512) as u64;
    let mut rand = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    // SAFETY: single-threaded; the only accesses to these statics.
    let (table, picked) = unsafe { (&mut *(&raw mut GEN), &mut *(&raw mut PICKED)) };
    let mut ok = true;
    let mut chosen = [0u64; 256];
    for g in 1..=gens.min(u64::from(u16::MAX)) {
        let n = writes.min(256).min(blocks) as usize;
        let mut k = 0;
        while k < n {
            let b = rand() % blocks;
            if picked[b as usize] == g as u16 {
                continue;
            }
            picked[b as usize] = g as u16;
            chosen[k] = b;
            k += 1;
        }
        let gseed = gen_seed(seed, g);
        let mut errors = 0u64;
        let r = d.transfer(
            true,
            &mut chosen[..n].iter().map(|b| (b + 1) * per),
            &mut |buf, sector| {
                for w in 0..words {
                    crate::io::wr::<u64>(buf + 8 * w, crate::pattern_word(gseed, sector, w));
                }
            },
            &mut |_, _, st| errors += (st != 0) as u64,
            timeout,
        );
        if r.is_err() || errors != 0 {
            say!("disk{i}.gen_error=pass {g} errors {errors} {}", r.err().unwrap_or(""));
            return false;
        }
        for b in &chosen[..n] {
            table[*b as usize] = g as u16;
        }
        say!("disk{i}.gen={g}");
    }
    let (mut bad, mut errors, mut written) = (0u64, 0u64, 0u64);
    let mut digest: u64 = 0xCBF2_9CE4_8422_2325;
    for b in 0..blocks {
        let g = u64::from(table[b as usize]);
        if g == 0 {
            continue;
        }
        written += 1;
        for byte in b.to_le_bytes().iter().chain(g.to_le_bytes().iter()) {
            digest = (digest ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01B3);
        }
    }
    let mut written_blocks = (0..blocks).filter(|b| table[*b as usize] != 0);
    let r = d.transfer(
        false,
        &mut written_blocks.by_ref().map(|b| (b + 1) * per),
        &mut |_, _| {},
        &mut |buf, sector, st| {
            if st != 0 {
                errors += 1;
                return;
            }
            let g = u64::from(table[(sector / per - 1) as usize]);
            let gseed = gen_seed(seed, g);
            if (0..words).any(|w| crate::io::rd::<u64>(buf + 8 * w) != crate::pattern_word(gseed, sector, w)) {
                bad += 1;
            }
        },
        timeout,
    );
    ok &= r.is_ok() && errors == 0 && bad == 0;
    if bad != 0 || errors != 0 {
        say!("disk{i}.gens_bad={bad} errors={errors}");
    }
    say!("disk{i}.gens_verify={}", if ok { "ok" } else { "fail" });
    say!("disk{i}.gens_blocks={written}");
    say!("disk{i}.gens_digest={digest:016x}");
    ok
}
