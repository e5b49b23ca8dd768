//! Printing the lease table: kubectl-style `table` / `wide`, and `json` / `yaml` with
//! stable snake_case keys.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use twill_proto::{Lease, ListLeasesResponse};

/// Output formats of `-o/--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns: NODE, SUBNET, PUBLIC-IP, VTEP-MAC, EXPIRES-IN.
    Table,
    /// The table plus VNI and REVISION.
    Wide,
    /// One JSON document: {"revision": N, "leases": [...]}.
    Json,
    /// The same document as YAML.
    Yaml,
}

/// One lease as printed by `-o json` / `-o yaml`. The field names are a stable interface.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LeaseDoc {
    /// Node holding the lease.
    pub node_name: String,
    /// Pod subnet, CIDR.
    pub subnet: String,
    /// Public (underlay) IPv4 address.
    pub public_ip: String,
    /// MAC of the node's VXLAN device.
    pub vtep_mac: String,
    /// Backend type, e.g. "vxlan".
    pub backend_type: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Revision of the lease's last change.
    pub revision: u64,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at_unix: i64,
    /// Expiry, RFC 3339 UTC.
    pub expires_at: String,
}

/// The document printed by `-o json` / `-o yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LeasesDoc {
    /// The lease table's revision when the list was taken.
    pub revision: u64,
    /// Leases ordered by node name.
    pub leases: Vec<LeaseDoc>,
}

impl From<&ListLeasesResponse> for LeasesDoc {
    fn from(r: &ListLeasesResponse) -> Self {
        LeasesDoc {
            revision: r.revision,
            leases: r.leases.iter().map(LeaseDoc::from).collect(),
        }
    }
}

impl From<&Lease> for LeaseDoc {
    fn from(l: &Lease) -> Self {
        LeaseDoc {
            node_name: l.node_name.clone(),
            subnet: l.subnet.clone(),
            public_ip: l.public_ip.clone(),
            vtep_mac: l.vtep_mac.clone(),
            backend_type: l.backend_type.clone(),
            vni: l.vni,
            revision: l.revision,
            expires_at_unix: l.expires_at_unix,
            expires_at: unix_to_rfc3339(l.expires_at_unix),
        }
    }
}

fn unix_to_rfc3339(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) => humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string(),
        Err(_) => String::new(),
    }
}

/// Renders the response in `format`; `now` is the reference for EXPIRES-IN.
/// Returns an empty string for an empty table in `table`/`wide` form (the caller says
/// "No leases found." on stderr, as kubectl does).
pub fn render_leases(resp: &ListLeasesResponse, format: Format, now: SystemTime) -> String {
    match format {
        Format::Table | Format::Wide => {
            if resp.leases.is_empty() {
                return String::new();
            }
            let wide = format == Format::Wide;
            let mut header = vec!["NODE", "SUBNET", "PUBLIC-IP", "VTEP-MAC", "EXPIRES-IN"];
            if wide {
                header.extend(["VNI", "REVISION"]);
            }
            let mut rows = vec![header.into_iter().map(str::to_string).collect::<Vec<_>>()];
            for l in &resp.leases {
                let mut row = vec![
                    or_none(&l.node_name),
                    or_none(&l.subnet),
                    or_none(&l.public_ip),
                    or_none(&l.vtep_mac),
                    expires_in(l.expires_at_unix, now),
                ];
                if wide {
                    row.push(l.vni.to_string());
                    row.push(l.revision.to_string());
                }
                rows.push(row);
            }
            table(&rows)
        }
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&LeasesDoc::from(resp))
                .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()));
            s.push('\n');
            s
        }
        Format::Yaml => yaml(&LeasesDoc::from(resp)),
    }
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        "<none>".to_string()
    } else {
        s.to_string()
    }
}

/// EXPIRES-IN column: the time left until `expires_at_unix`, humanized.
fn expires_in(expires_at_unix: i64, now: SystemTime) -> String {
    if expires_at_unix <= 0 {
        return "<unknown>".to_string();
    }
    let now = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(_) => 0,
    };
    let left = expires_at_unix - now;
    if left < 0 {
        return "expired".to_string();
    }
    humanize(Duration::from_secs(left as u64))
}

/// Humanizes a duration with at most two units, like kubectl's ages:
/// `45s`, `5m3s`, `59m`, `23h59m`, `3d4h`, `400d`.
pub fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    let (m, s) = (secs / 60, secs % 60);
    let (h, mm) = (secs / 3600, (secs / 60) % 60);
    let (days, hh) = (secs / 86_400, (secs / 3600) % 24);
    let two = |big: u64, bu: &str, small: u64, su: &str| {
        if small == 0 {
            format!("{big}{bu}")
        } else {
            format!("{big}{bu}{small}{su}")
        }
    };
    if secs < 120 {
        format!("{secs}s")
    } else if secs < 3600 {
        two(m, "m", s, "s")
    } else if secs < 48 * 3600 {
        two(h, "h", mm, "m")
    } else if secs < 8 * 86_400 {
        two(days, "d", hh, "h")
    } else {
        format!("{days}d")
    }
}

/// Left-aligned columns separated by three spaces, without trailing blanks (kubectl's look).
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 3;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// YAML for the lease document. Strings are double-quoted (JSON escaping is valid YAML),
/// so values such as MAC addresses are never read back as numbers.
fn yaml(doc: &LeasesDoc) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
    let mut out = format!("revision: {}\n", doc.revision);
    if doc.leases.is_empty() {
        out.push_str("leases: []\n");
        return out;
    }
    out.push_str("leases:\n");
    for l in &doc.leases {
        out.push_str(&format!("- node_name: {}\n", q(&l.node_name)));
        out.push_str(&format!("  subnet: {}\n", q(&l.subnet)));
        out.push_str(&format!("  public_ip: {}\n", q(&l.public_ip)));
        out.push_str(&format!("  vtep_mac: {}\n", q(&l.vtep_mac)));
        out.push_str(&format!("  backend_type: {}\n", q(&l.backend_type)));
        out.push_str(&format!("  vni: {}\n", l.vni));
        out.push_str(&format!("  revision: {}\n", l.revision));
        out.push_str(&format!("  expires_at_unix: {}\n", l.expires_at_unix));
        out.push_str(&format!("  expires_at: {}\n", q(&l.expires_at)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, subnet: &str, expires: i64) -> Lease {
        Lease {
            node_name: name.into(),
            subnet: subnet.into(),
            public_ip: "192.168.1.10".into(),
            backend_type: "vxlan".into(),
            vtep_mac: "0a:58:0a:f4:01:01".into(),
            expires_at_unix: expires,
            revision: 7,
            vni: 1,
            ..Default::default()
        }
    }

    #[test]
    fn humanize_like_kubectl() {
        let h = |s| humanize(Duration::from_secs(s));
        assert_eq!(h(0), "0s");
        assert_eq!(h(119), "119s");
        assert_eq!(h(120), "2m");
        assert_eq!(h(303), "5m3s");
        assert_eq!(h(3599), "59m59s");
        assert_eq!(h(3600), "1h");
        assert_eq!(h(86_399), "23h59m");
        assert_eq!(h(47 * 3600 + 60), "47h1m");
        assert_eq!(h(3 * 86_400 + 4 * 3600 + 5), "3d4h");
        assert_eq!(h(400 * 86_400), "400d");
    }

    #[test]
    fn table_aligns_columns() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let resp = ListLeasesResponse {
            leases: vec![
                lease("a", "10.244.1.0/24", 1_000_000 + 86_399),
                lease("node-long-name", "10.244.12.0/24", 1_000_000 - 5),
            ],
            revision: 9,
            ..Default::default()
        };
        let out = render_leases(&resp, Format::Table, now);
        let expected = "\
NODE             SUBNET           PUBLIC-IP      VTEP-MAC            EXPIRES-IN
a                10.244.1.0/24    192.168.1.10   0a:58:0a:f4:01:01   23h59m
node-long-name   10.244.12.0/24   192.168.1.10   0a:58:0a:f4:01:01   expired
";
        assert_eq!(out, expected);
        let wide = render_leases(&resp, Format::Wide, now);
        assert!(wide.starts_with("NODE "), "{wide}");
        assert!(
            wide.lines()
                .next()
                .unwrap()
                .ends_with("EXPIRES-IN   VNI   REVISION"),
            "{wide}"
        );
        assert!(
            wide.lines()
                .nth(1)
                .unwrap()
                .ends_with("23h59m       1     7"),
            "{wide}"
        );
    }

    #[test]
    fn json_has_stable_keys() {
        let resp = ListLeasesResponse {
            leases: vec![lease("a", "10.244.1.0/24", 86_400)],
            revision: 3,
            ..Default::default()
        };
        let out = render_leases(&resp, Format::Json, UNIX_EPOCH);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["revision"], 3);
        let l = &v["leases"][0];
        assert_eq!(l["node_name"], "a");
        assert_eq!(l["subnet"], "10.244.1.0/24");
        assert_eq!(l["public_ip"], "192.168.1.10");
        assert_eq!(l["vtep_mac"], "0a:58:0a:f4:01:01");
        assert_eq!(l["vni"], 1);
        assert_eq!(l["revision"], 7);
        assert_eq!(l["expires_at_unix"], 86_400);
        assert_eq!(l["expires_at"], "1970-01-02T00:00:00Z");
        assert!(out.find("\"revision\"").unwrap() < out.find("\"leases\"").unwrap());
    }

    #[test]
    fn yaml_quotes_strings() {
        let resp = ListLeasesResponse {
            leases: vec![lease("a", "10.244.1.0/24", 86_400)],
            revision: 3,
            ..Default::default()
        };
        let out = render_leases(&resp, Format::Yaml, UNIX_EPOCH);
        assert!(
            out.starts_with("revision: 3\nleases:\n- node_name: \"a\"\n"),
            "{out}"
        );
        assert!(out.contains("  vtep_mac: \"0a:58:0a:f4:01:01\"\n"), "{out}");
        let empty = render_leases(&ListLeasesResponse::default(), Format::Yaml, UNIX_EPOCH);
        assert_eq!(empty, "revision: 0\nleases: []\n");
    }

    #[test]
    fn empty_table_prints_nothing() {
        assert_eq!(
            render_leases(&ListLeasesResponse::default(), Format::Table, UNIX_EPOCH),
            ""
        );
    }
}
