//! What the agent, the controller and twillctl agree on about a node's pod addresses
//! (REFERENCE 2.11): how many a subnet can give, and when it counts as nearly full.

use ipnet::IpNet;

/// A subnet is nearly full from this share of its addresses, in percent: the agent
/// warns in its log and `twillctl status` names it.
pub const NEARLY_FULL_PERCENT: u64 = 90;

/// Addresses of `subnet` host-local can hand out: all but the network address, the
/// gateway (the first host, the bridge's) and, in IPv4, the broadcast address;
/// capped for IPv6.
pub fn usable(subnet: IpNet) -> u64 {
    let host_bits = u32::from(subnet.max_prefix_len() - subnet.prefix_len());
    let size = 1u64.checked_shl(host_bits.min(63)).unwrap_or(u64::MAX);
    let reserved = match subnet {
        IpNet::V4(_) => 3,
        IpNet::V6(_) => 2,
    };
    size.saturating_sub(reserved)
}

/// Whether `used` of `total` addresses is nearly full ([`NEARLY_FULL_PERCENT`]).
pub fn nearly_full(used: u64, total: u64) -> bool {
    total > 0 && used.saturating_mul(100) >= total.saturating_mul(NEARLY_FULL_PERCENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_addresses_leave_out_the_network_gateway_and_broadcast() {
        assert_eq!(usable("10.244.1.0/24".parse().unwrap()), 253);
        assert_eq!(usable("10.244.1.0/30".parse().unwrap()), 1);
        assert_eq!(usable("10.244.1.0/32".parse().unwrap()), 0);
        assert_eq!(usable("fd00::/120".parse().unwrap()), 254);
        assert_eq!(usable("fd00::/64".parse().unwrap()), (1u64 << 63) - 2);
    }

    #[test]
    fn nearly_full_from_ninety_percent() {
        assert!(nearly_full(228, 253));
        assert!(!nearly_full(227, 253));
        assert!(nearly_full(12, 13));
        assert!(!nearly_full(0, 0));
    }
}
