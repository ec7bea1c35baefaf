//! The direct path of a qcow2 queue: a read or write whose clusters the queue has seen
//! allocated in the image itself goes from the guest's buffers straight to the image
//! file's engine, as on a raw disk: no imago future, lookup or lock on the way.
//!
//! Each queue keeps what it learned ([`MapCache`]: guest cluster to host cluster, for
//! clusters the image's own file holds and may be written in place). A mapping like
//! that changes only when clusters are freed or zeroed (discard, write-zeroes), which
//! take the image's lock exclusively and bump its generation first; a direct request
//! holds the lock shared until it completes, and a cache of an older generation is
//! dropped before use. So a cached mapping is never used after its cluster could have
//! been handed to other data.

/// Clusters per page of the map.
const PAGE: usize = 4096;

/// Pages of the map at most (a map that would grow past it starts over): 65536
/// clusters, 4 GiB of guest space with 64 KiB clusters, 512 KiB of memory.
const MAX_PAGES: usize = 16;

/// Cached clusters per queue at most.
const MAX_CACHED: usize = PAGE * MAX_PAGES;

/// The highest page index the map covers: clusters past it (beyond 2^30 clusters, 64
/// TiB with 64 KiB clusters) always take the full path.
const MAX_PAGE_INDEX: u64 = 1 << 18;

/// What a finished request found out about its range: `clusters` guest clusters from
/// byte `guest` on are held in place by the image file from byte `host` on. Valid for
/// the image generation it was learned in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Learned {
    /// The image generation it was learned in.
    pub generation: u64,
    /// The first guest cluster's byte offset.
    pub guest: u64,
    /// The first host cluster's byte offset in the image file.
    pub host: u64,
    /// How many clusters, contiguous in both.
    pub clusters: u64,
}

/// One queue's guest-to-host cluster map of in-place clusters: pages of [`PAGE`]
/// entries (host cluster + 1, or 0 for not known), made as they are first needed.
pub struct MapCache {
    cluster_bits: u32,
    generation: u64,
    pages: Vec<Option<Box<[u64]>>>,
    allocated: usize,
}

impl MapCache {
    /// An empty map for an image of `1 << cluster_bits` byte clusters.
    pub fn new(cluster_bits: u32) -> MapCache {
        MapCache {
            cluster_bits,
            generation: 0,
            pages: Vec::new(),
            allocated: 0,
        }
    }

    fn clear(&mut self) {
        self.pages.clear();
        self.allocated = 0;
    }

    /// Forgets everything learned before image generation `current`.
    pub fn sync_generation(&mut self, current: u64) {
        if current != self.generation {
            self.clear();
            self.generation = current;
        }
    }

    /// Takes in `learned` if it is of image generation `current`.
    pub fn learn(&mut self, learned: Learned, current: u64) {
        if learned.generation != current {
            return;
        }
        self.sync_generation(current);
        if learned.clusters > MAX_CACHED as u64 {
            return;
        }
        let (guest, host) = (
            learned.guest >> self.cluster_bits,
            learned.host >> self.cluster_bits,
        );
        for i in 0..learned.clusters {
            self.insert(guest + i, host + i);
        }
    }

    /// Cluster `guest`'s page and index in it, for a page the map may hold.
    fn place(guest: u64) -> Option<(usize, usize)> {
        let page = guest / PAGE as u64;
        if page >= MAX_PAGE_INDEX {
            return None;
        }
        Some((
            usize::try_from(page).ok()?,
            usize::try_from(guest % PAGE as u64).ok()?,
        ))
    }

    fn insert(&mut self, guest: u64, host: u64) {
        let Some((page, index)) = Self::place(guest) else {
            return;
        };
        if self.pages.len() <= page {
            self.pages.resize_with(page + 1, || None);
        }
        if self.pages[page].is_none() {
            if self.allocated == MAX_PAGES {
                self.clear();
                self.pages.resize_with(page + 1, || None);
            }
            self.pages[page] = Some(vec![0; PAGE].into_boxed_slice());
            self.allocated += 1;
        }
        if let Some(entries) = self.pages[page].as_mut() {
            entries[index] = host + 1;
        }
    }

    fn get(&self, guest: u64) -> Option<u64> {
        let (page, index) = Self::place(guest)?;
        self.pages.get(page)?.as_ref()?[index].checked_sub(1)
    }

    /// The host offset of guest range `offset..offset + len` (not empty) when every
    /// cluster of it is cached and they lie in one piece in the file.
    pub fn host_range(&self, offset: u64, len: u64) -> Option<u64> {
        if self.allocated == 0 || len == 0 {
            return None;
        }
        let first = offset >> self.cluster_bits;
        let last = offset.checked_add(len - 1)? >> self.cluster_bits;
        let host = self.get(first)?;
        for (i, cluster) in (first + 1..=last).enumerate() {
            if self.get(cluster) != Some(host + 1 + i as u64) {
                return None;
            }
        }
        let within = offset & ((1u64 << self.cluster_bits) - 1);
        Some((host << self.cluster_bits) + within)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CB: u32 = 16;
    const C: u64 = 1 << CB;

    fn learned(generation: u64, guest: u64, host: u64, clusters: u64) -> Learned {
        Learned {
            generation,
            guest: guest * C,
            host: host * C,
            clusters,
        }
    }

    #[test]
    fn a_learned_range_maps_within_and_across_its_clusters() {
        let mut m = MapCache::new(CB);
        m.learn(learned(0, 10, 3, 2), 0);
        assert_eq!(m.host_range(10 * C + 512, 4096), Some(3 * C + 512));
        assert_eq!(m.host_range(11 * C - 4096, 8192), Some(4 * C - 4096));
        // Past what was learned, or before it.
        assert_eq!(m.host_range(12 * C - 4096, 8192), None);
        assert_eq!(m.host_range(9 * C, 4096), None);
    }

    #[test]
    fn clusters_apart_in_the_file_are_not_one_range() {
        let mut m = MapCache::new(CB);
        m.learn(learned(0, 10, 3, 1), 0);
        m.learn(learned(0, 11, 7, 1), 0);
        assert_eq!(m.host_range(11 * C, 4096), Some(7 * C));
        assert_eq!(m.host_range(11 * C - 4096, 8192), None);
    }

    #[test]
    fn a_new_generation_forgets_and_an_old_lesson_is_refused() {
        let mut m = MapCache::new(CB);
        m.learn(learned(0, 10, 3, 1), 0);
        m.sync_generation(1);
        assert_eq!(m.host_range(10 * C, 4096), None);
        // Learned before a discard that came since: not taken.
        m.learn(learned(0, 10, 3, 1), 1);
        assert_eq!(m.host_range(10 * C, 4096), None);
        m.learn(learned(1, 10, 5, 1), 1);
        assert_eq!(m.host_range(10 * C, 4096), Some(5 * C));
    }

    #[test]
    fn the_cache_stays_bounded() {
        let mut m = MapCache::new(CB);
        m.learn(learned(0, 0, 0, MAX_CACHED as u64), 0);
        m.learn(learned(0, MAX_CACHED as u64, 0, 1), 0);
        assert!(m.allocated <= MAX_PAGES);
        assert_eq!(m.host_range(MAX_CACHED as u64 * C, 4096), Some(0));
        // A lesson larger than the whole cache is not taken.
        m.learn(learned(0, 0, 0, MAX_CACHED as u64 + 1), 0);
        assert_eq!(m.host_range(0, 4096), None);
        assert_eq!(m.host_range(u64::MAX - 10, 100), None);
    }
}
