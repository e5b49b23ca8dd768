//! The address-family dimension: what a dual-stack network has once per family.
//! Code that handles "each family" iterates a [`PerFamily`] instead of writing an IPv4
//! block and an IPv6 block; a further dimension (networks) is a map of these, not a
//! third copy.

use std::net::IpAddr;

use ipnet::IpNet;

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The family of a network.
    pub fn of_net(net: IpNet) -> Family {
        Family::of(net.addr())
    }

    /// The prefix length of a single address: 32 or 128.
    pub fn host_prefix_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// The family's name in messages (`IPv4`, `IPv6`).
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One `T` for each family a network has (IPv4 only, dual-stack or IPv6 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PerFamily<T> {
    /// The IPv4 side.
    pub v4: Option<T>,
    /// The IPv6 side.
    pub v6: Option<T>,
}

impl<T> Default for PerFamily<T> {
    fn default() -> Self {
        PerFamily { v4: None, v6: None }
    }
}

impl<T> PerFamily<T> {
    /// The sides given.
    pub fn new(v4: Option<T>, v6: Option<T>) -> Self {
        PerFamily { v4, v6 }
    }

    /// Builds each family's side with `f`.
    pub fn from_fn(mut f: impl FnMut(Family) -> Option<T>) -> Self {
        PerFamily {
            v4: f(Family::V4),
            v6: f(Family::V6),
        }
    }

    /// The side of `family`.
    pub fn get(&self, family: Family) -> Option<&T> {
        match family {
            Family::V4 => self.v4.as_ref(),
            Family::V6 => self.v6.as_ref(),
        }
    }

    /// The side of `family`, to change.
    pub fn get_mut(&mut self, family: Family) -> Option<&mut T> {
        self.slot(family).as_mut()
    }

    /// The place of `family`'s side, to set or take.
    pub fn slot(&mut self, family: Family) -> &mut Option<T> {
        match family {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }

    /// Whether `family` has a side.
    pub fn has(&self, family: Family) -> bool {
        self.get(family).is_some()
    }

    /// True when no family has a side.
    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }

    /// The present sides with their family, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = (Family, &T)> {
        self.v4
            .iter()
            .map(|t| (Family::V4, t))
            .chain(self.v6.iter().map(|t| (Family::V6, t)))
    }

    /// The present sides with their family, to change, IPv4 first.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Family, &mut T)> {
        self.v4
            .iter_mut()
            .map(|t| (Family::V4, t))
            .chain(self.v6.iter_mut().map(|t| (Family::V6, t)))
    }

    /// The present sides, IPv4 first.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.v4.iter().chain(&self.v6)
    }

    /// The first present side (IPv4 on a network that has it).
    pub fn first(&self) -> Option<&T> {
        self.v4.as_ref().or(self.v6.as_ref())
    }

    /// References to the sides.
    pub fn as_ref(&self) -> PerFamily<&T> {
        PerFamily {
            v4: self.v4.as_ref(),
            v6: self.v6.as_ref(),
        }
    }

    /// Maps each present side.
    pub fn map<U>(self, mut f: impl FnMut(Family, T) -> U) -> PerFamily<U> {
        PerFamily {
            v4: self.v4.map(|t| f(Family::V4, t)),
            v6: self.v6.map(|t| f(Family::V6, t)),
        }
    }

    /// Maps each present side to an optional one.
    pub fn filter_map<U>(self, mut f: impl FnMut(Family, T) -> Option<U>) -> PerFamily<U> {
        PerFamily {
            v4: self.v4.and_then(|t| f(Family::V4, t)),
            v6: self.v6.and_then(|t| f(Family::V6, t)),
        }
    }

    /// Maps each present side, stopping at the first error (IPv4 first).
    pub fn try_map<U, E>(
        self,
        mut f: impl FnMut(Family, T) -> Result<U, E>,
    ) -> Result<PerFamily<U>, E> {
        Ok(PerFamily {
            v4: self.v4.map(|t| f(Family::V4, t)).transpose()?,
            v6: self.v6.map(|t| f(Family::V6, t)).transpose()?,
        })
    }

    /// Pairs the sides of the families both have.
    pub fn zip<U>(self, other: PerFamily<U>) -> PerFamily<(T, U)> {
        PerFamily {
            v4: self.v4.zip(other.v4),
            v6: self.v6.zip(other.v6),
        }
    }

    /// Which families have a side.
    pub fn families(&self) -> PerFamily<()> {
        PerFamily {
            v4: self.v4.as_ref().map(|_| ()),
            v6: self.v6.as_ref().map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_iterate_ipv4_first_and_map_zip_keep_families() {
        let p = PerFamily::new(Some(4), Some(6));
        assert_eq!(
            p.iter().collect::<Vec<_>>(),
            vec![(Family::V4, &4), (Family::V6, &6)]
        );
        let only6 = PerFamily::new(None, Some("six"));
        assert_eq!(only6.first(), Some(&"six"));
        assert_eq!(p.zip(only6), PerFamily::new(None, Some((6, "six"))));
        assert_eq!(p.map(|f, n| (f, n * 2)).v4, Some((Family::V4, 8)));
        let r: Result<PerFamily<u8>, String> = p.try_map(|f, n| {
            if f == Family::V6 {
                Err(format!("{f}"))
            } else {
                Ok(n)
            }
        });
        assert_eq!(r.unwrap_err(), "IPv6");
        assert!(PerFamily::<u8>::default().is_empty());
        assert_eq!(p.families(), PerFamily::new(Some(()), Some(())));
    }
}
