//! Label selectors, as Kubernetes evaluates them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector` (all of `matchLabels` and every
/// `matchExpressions` entry). An empty selector matches everything.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // An unknown operator matches nothing, as the API server would
            // have refused it.
            _ => false,
        }
    });
    by_labels && by_expressions
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selectors_match_like_kubernetes() {
        let l = labels(&[("app", "db"), ("tier", "gold")]);
        let mut s = LabelSelector {
            match_labels: Some(labels(&[("app", "db")])),
            ..Default::default()
        };
        assert!(matches(&s, &l));
        s.match_expressions = Some(vec![expr("tier", "In", &["gold", "silver"])]);
        assert!(matches(&s, &l));
        s.match_expressions = Some(vec![expr("tier", "NotIn", &["gold"])]);
        assert!(!matches(&s, &l));
        s.match_expressions = Some(vec![expr("zone", "DoesNotExist", &[])]);
        assert!(matches(&s, &l));
        s.match_expressions = Some(vec![expr("zone", "Exists", &[])]);
        assert!(!matches(&s, &l));
        assert!(matches(&LabelSelector::default(), &l));
    }
}
