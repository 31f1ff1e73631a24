//! ResourceQuota admission of Pods, as kube-apiserver's `ResourceQuota`
//! admission plugin does it for the resources a VM's reservation pod uses.
//!
//! A Pod create is refused with `403 Forbidden` when, for some resource a
//! quota of the namespace limits in `spec.hard`, what the namespace's
//! non-terminal Pods use plus what the new Pod asks exceeds the limit. The
//! message has kube-apiserver's shape:
//! `pods "x" is forbidden: exceeded quota: q, requested: requests.memory=192Mi, used: requests.memory=192Mi, limited: requests.memory=256Mi`.
//!
//! Counted resources: `pods` and `count/pods`; `requests.cpu` and `cpu`,
//! `requests.memory` and `memory` (a container's request, else its limit);
//! `limits.cpu` and `limits.memory`. Other keys of `spec.hard` are kept in
//! the status but not enforced.
//!
//! Simplifications versus a real API server:
//! - there is no kubelet: a Pod is stored with `status.phase: Running` and
//!   stays so, and only Pods whose phase a client set to `Succeeded` or
//!   `Failed` stop counting;
//! - init containers, pod overhead, scopes and scope selectors are ignored,
//!   and a Pod without requests for a limited resource is not refused;
//! - `status.hard` and `status.used` are written when a quota is created and
//!   whenever a Pod of its namespace is created or removed (not when only the
//!   quota's `spec` changes).

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// Milli-units per resource name (millicores, milli-bytes, milli-pods), so
/// that every resource adds up as integers.
pub type Usage = BTreeMap<String, i128>;

/// Parses a Kubernetes quantity into milli-units (`100m` is 100, `1` is
/// 1000, `64Mi` is 64 * 2^20 * 1000). `None` when it is not a quantity.
pub fn parse_milli(text: &str) -> Option<i128> {
    let text = text.trim();
    const SUFFIXES: [(&str, i128); 13] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
        ("m", 0),
    ];
    let (number, multiplier) = SUFFIXES
        .iter()
        .find_map(|(s, m)| text.strip_suffix(s).map(|n| (n, *m)))
        .unwrap_or((text, 1));
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // The number scaled by 10^digits, then by the suffix and 1000 (milli).
    let digits = u32::try_from(fraction.len()).ok().filter(|d| *d <= 9)?;
    let scaled: i128 = format!("{whole}{fraction}").parse().ok()?;
    let scale = 10i128.pow(digits);
    if multiplier == 0 {
        // `m`: the number is milli-units already.
        return Some(scaled / scale);
    }
    Some((scaled * multiplier * 1000 + scale - 1) / scale)
}

/// Milli-units shown as a quantity: memory-like values in binary units when
/// whole, CPU in millicores when not whole.
pub fn format_milli(resource: &str, milli: i128) -> String {
    if milli % 1000 != 0 {
        return format!("{milli}m");
    }
    let whole = milli / 1000;
    if resource.ends_with("memory") && whole != 0 {
        for (suffix, unit) in [("Gi", 1i128 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if whole % unit == 0 {
                return format!("{}{suffix}", whole / unit);
            }
        }
    }
    whole.to_string()
}

/// Whether the Pod has ended (`Succeeded` or `Failed`).
pub fn is_terminal(pod: &Value) -> bool {
    matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

/// What one Pod counts against quotas.
pub fn pod_usage(pod: &Value) -> Usage {
    let mut usage = Usage::new();
    usage.insert("pods".into(), 1000);
    usage.insert("count/pods".into(), 1000);
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for c in &containers {
        for resource in ["cpu", "memory"] {
            let request = c
                .pointer(&format!("/resources/requests/{resource}"))
                .or_else(|| c.pointer(&format!("/resources/limits/{resource}")));
            let limit = c.pointer(&format!("/resources/limits/{resource}"));
            let milli = |v: Option<&Value>| v.and_then(quantity_text).and_then(|t| parse_milli(&t));
            if let Some(r) = milli(request) {
                *usage.entry(format!("requests.{resource}")).or_default() += r;
                *usage.entry(resource.to_string()).or_default() += r;
            }
            if let Some(l) = milli(limit) {
                *usage.entry(format!("limits.{resource}")).or_default() += l;
            }
        }
    }
    usage
}

fn quantity_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// What `pods` (the namespace's) use together, terminal ones left out.
pub fn namespace_usage(pods: &[Value]) -> Usage {
    let mut total = Usage::new();
    for pod in pods.iter().filter(|p| !is_terminal(p)) {
        for (k, v) in pod_usage(pod) {
            *total.entry(k).or_default() += v;
        }
    }
    total
}

fn hard_of(quota: &Value) -> Vec<(String, i128)> {
    quota
        .pointer("/spec/hard")
        .and_then(Value::as_object)
        .map(|hard| {
            hard.iter()
                .filter_map(|(k, v)| Some((k.clone(), parse_milli(&quantity_text(v)?)?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks a new Pod asking `requested` against `quota` with `used` in use;
/// `Err` with kube-apiserver's message tail (from `exceeded quota:`).
pub fn check(quota: &Value, used: &Usage, requested: &Usage) -> Result<(), String> {
    let mut over = Vec::new();
    for (resource, limit) in hard_of(quota) {
        let Some(asked) = requested.get(&resource).copied() else {
            continue;
        };
        let now = used.get(&resource).copied().unwrap_or(0);
        if now + asked > limit {
            over.push((resource, asked, now, limit));
        }
    }
    if over.is_empty() {
        return Ok(());
    }
    let list = |pick: fn(&(String, i128, i128, i128)) -> i128| {
        over.iter()
            .map(|o| format!("{}={}", o.0, format_milli(&o.0, pick(o))))
            .collect::<Vec<_>>()
            .join(",")
    };
    let name = quota
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    Err(format!(
        "exceeded quota: {name}, requested: {}, used: {}, limited: {}",
        list(|o| o.1),
        list(|o| o.2),
        list(|o| o.3)
    ))
}

/// The status a quota shows with `used` in use: `hard` as in its spec, and
/// `used` for each resource it limits.
pub fn status(quota: &Value, used: &Usage) -> Value {
    let hard = quota
        .pointer("/spec/hard")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let mut shown = serde_json::Map::new();
    if let Some(keys) = hard.as_object() {
        for key in keys.keys() {
            let milli = used.get(key).copied().unwrap_or(0);
            shown.insert(key.clone(), Value::String(format_milli(key, milli)));
        }
    }
    json!({"hard": hard, "used": shown})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(cpu: &str, memory: &str) -> Value {
        json!({"spec": {"containers": [{"name": "c", "resources": {
            "requests": {"cpu": cpu, "memory": memory},
            "limits": {"memory": memory}
        }}]}})
    }

    #[test]
    fn quantities_parse_into_milli_units() {
        assert_eq!(parse_milli("100m"), Some(100));
        assert_eq!(parse_milli("1"), Some(1000));
        assert_eq!(parse_milli("0.5"), Some(500));
        assert_eq!(parse_milli("64Mi"), Some((64 << 20) * 1000));
        assert_eq!(parse_milli("1G"), Some(1_000_000_000_000));
        assert_eq!(parse_milli("x"), None);
        assert_eq!(parse_milli(""), None);
        assert_eq!(format_milli("requests.memory", (192 << 20) * 1000), "192Mi");
        assert_eq!(format_milli("requests.cpu", 100), "100m");
        assert_eq!(format_milli("pods", 2000), "2");
    }

    #[test]
    fn a_pod_over_the_hard_limit_is_refused_with_the_api_server_message() {
        let quota = json!({"metadata": {"name": "one-vm"}, "spec": {"hard": {
            "requests.memory": "256Mi", "pods": "5"
        }}});
        let used = namespace_usage(&[pod("100m", "192Mi")]);
        assert_eq!(used["requests.memory"], (192 << 20) * 1000);
        assert!(check(&quota, &Usage::new(), &pod_usage(&pod("100m", "192Mi"))).is_ok());
        let refused = check(&quota, &used, &pod_usage(&pod("100m", "192Mi"))).unwrap_err();
        assert_eq!(
            refused,
            "exceeded quota: one-vm, requested: requests.memory=192Mi, used: requests.memory=192Mi, limited: requests.memory=256Mi"
        );
        let shown = status(&quota, &used);
        assert_eq!(shown["used"]["requests.memory"], "192Mi");
        assert_eq!(shown["used"]["pods"], "1");
    }

    #[test]
    fn ended_pods_do_not_count() {
        let mut done = pod("1", "1Gi");
        done["status"] = json!({"phase": "Succeeded"});
        assert!(namespace_usage(&[done]).is_empty());
    }
}
