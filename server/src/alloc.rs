//! The free-subnet index: which subnets between SubnetMin and SubnetMax are taken.
//!
//! A bitmap (one bit per subnet, 8 KiB for the 65,536 /24s of a /8) with a next-fit
//! cursor: picking a free subnet skips whole words of taken subnets, never scans
//! leases, and hands out recently freed subnets last (a departed node's stale routes
//! have time to go before its subnet is reused).

use twill_common::netconf::{Pool, PoolNet};

/// Tracks taken subnets of one pool (the IPv4 network, or the IPv6 one) by their index
/// counted from its SubnetMin.
#[derive(Debug, Clone)]
pub struct Allocator<N> {
    pool: Pool<N>,
    words: Vec<u64>,
    cursor: u32,
    taken: u32,
}

impl<N: PoolNet> Allocator<N> {
    /// An index with every subnet of `pool` free.
    pub fn new(pool: &Pool<N>) -> Self {
        let count = pool.count();
        Allocator {
            pool: pool.clone(),
            words: vec![0; count.div_ceil(64) as usize],
            cursor: 0,
            taken: 0,
        }
    }

    /// Number of allocatable subnets.
    pub fn capacity(&self) -> u32 {
        self.pool.count()
    }

    /// Number of subnets taken.
    pub fn taken(&self) -> u32 {
        self.taken
    }

    /// True when `subnet` is allocatable and not taken.
    #[cfg(test)]
    fn is_free(&self, subnet: N) -> bool {
        self.pool.index_of(subnet).is_some_and(|i| !self.bit(i))
    }

    /// Marks `subnet` taken; false when it is outside the range or already taken.
    pub fn take(&mut self, subnet: N) -> bool {
        match self.pool.index_of(subnet) {
            Some(i) if !self.bit(i) => {
                self.set(i, true);
                true
            }
            _ => false,
        }
    }

    /// Marks `subnet` free again.
    pub fn free(&mut self, subnet: N) {
        if let Some(i) = self.pool.index_of(subnet) {
            if self.bit(i) {
                self.set(i, false);
            }
        }
    }

    /// Takes the next free subnet after the cursor, wrapping around; `None` when full.
    pub fn allocate(&mut self) -> Option<N> {
        let count = self.capacity();
        if self.taken >= count {
            return None;
        }
        let mut i = self.cursor % count;
        // At most one pass over the words plus the partial first word.
        for _ in 0..=self.words.len() + 1 {
            let word = self.words[(i / 64) as usize] | ((1u64 << (i % 64)) - 1);
            if word != u64::MAX {
                let candidate = (i / 64) * 64 + word.trailing_ones();
                if candidate < count {
                    self.set(candidate, true);
                    self.cursor = candidate + 1;
                    return Some(self.pool.at(candidate));
                }
            }
            i = ((i / 64 + 1) * 64) % count.next_multiple_of(64);
            if i >= count {
                i = 0;
            }
        }
        None
    }

    fn bit(&self, i: u32) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: u32, on: bool) {
        let w = &mut self.words[(i / 64) as usize];
        if on {
            *w |= 1 << (i % 64);
            self.taken += 1;
        } else {
            *w &= !(1 << (i % 64));
            self.taken -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use twill_common::NetConf;

    use super::*;

    fn conf(text: &str) -> twill_common::netconf::Ipv4Pool {
        NetConf::parse(text).unwrap().ipv4.unwrap()
    }

    #[test]
    fn hands_out_every_subnet_once_then_refuses() {
        let c = conf(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#);
        let mut a = Allocator::new(&c);
        let mut seen = HashSet::new();
        while let Some(s) = a.allocate() {
            assert!(c.index_of(s).is_some(), "{s} in range");
            assert!(seen.insert(s), "{s} handed out twice");
        }
        assert_eq!(seen.len(), 255);
        assert_eq!(a.taken(), 255);
        assert!(
            !seen.contains(&"10.244.0.0/24".parse().unwrap()),
            "first subnet skipped"
        );
    }

    #[test]
    fn freed_subnets_come_back_after_the_rest() {
        let c = conf(r#"{"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}"#);
        let mut a = Allocator::new(&c);
        let first = a.allocate().unwrap();
        assert_eq!(first.to_string(), "10.0.1.0/24");
        let second = a.allocate().unwrap();
        a.free(first);
        assert_ne!(
            a.allocate().unwrap(),
            first,
            "next-fit does not reuse at once"
        );
        assert!(a.is_free(first));
        assert!(!a.is_free(second));
        assert!(a.take(first));
        assert!(!a.take(first));
        assert!(!a.take("11.0.0.0/24".parse().unwrap()));
    }

    #[test]
    fn wraps_around_to_fill_holes() {
        let c =
            conf(r#"{"Network": "10.1.0.0/18", "SubnetLen": 26, "Backend": {"Type": "vxlan"}}"#);
        let mut a = Allocator::new(&c);
        let all: Vec<_> = std::iter::from_fn(|| a.allocate()).collect();
        assert_eq!(all.len() as u32, c.count());
        a.free(all[3]);
        a.free(all[70]);
        let mut again = vec![a.allocate().unwrap(), a.allocate().unwrap()];
        again.sort();
        assert_eq!(again, vec![all[3], all[70]]);
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn hands_out_ipv6_subnets() {
        let pool = NetConf::parse(
            r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/60",
                "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap()
        .ipv6
        .unwrap();
        let mut a = Allocator::new(&pool);
        let all: Vec<_> = std::iter::from_fn(|| a.allocate()).collect();
        assert_eq!(all.len(), 15);
        assert_eq!(all[0].to_string(), "fd00:10:244:1::/64");
        assert_eq!(all[14].to_string(), "fd00:10:244:f::/64");
        a.free(all[4]);
        assert!(a.is_free(all[4]));
        assert_eq!(a.allocate(), Some(all[4]));
    }
}
