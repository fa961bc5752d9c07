//! What the API server counted: `apiserver_request_total` from its own `/metrics`, by verb and
//! resource, so that a benchmark can report the requests a run caused, a figure that does not
//! depend on the machine's speed or noise.

use std::collections::BTreeMap;

/// Requests counted by the API server, by (verb, resource[/subresource]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestCounts(pub BTreeMap<(String, String), f64>);

/// Resources the control plane writes to keep itself going (the API server's own lease and the
/// `kubernetes` Service's endpoints, every few seconds), whoever else runs.
pub const UPKEEP: [&str; 3] = ["endpoints", "endpointslices", "leases"];

/// Verbs that change something.
pub const WRITES: [&str; 5] = ["POST", "PUT", "PATCH", "APPLY", "DELETE"];

impl RequestCounts {
    /// Reads the API server's counters now.
    pub async fn read(client: &kube::Client) -> anyhow::Result<RequestCounts> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let text = client.request_text(request).await?;
        Ok(RequestCounts::parse(&text))
    }

    /// Sums `apiserver_request_total` samples by verb and resource (over codes, scopes, groups
    /// and versions).
    pub fn parse(text: &str) -> RequestCounts {
        let mut counts = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split("\",")
                    .filter_map(|pair| pair.split_once("=\""))
                    .find(|(key, _)| *key == name)
                    .map(|(_, v)| v.trim_end_matches('"').to_string())
                    .unwrap_or_default()
            };
            let resource = match label("subresource") {
                sub if sub.is_empty() => label("resource"),
                sub => format!("{}/{sub}", label("resource")),
            };
            *counts.entry((label("verb"), resource)).or_insert(0.0) += value;
        }
        RequestCounts(counts)
    }

    /// What was counted since `before`, zeros left out.
    pub fn since(&self, before: &RequestCounts) -> RequestCounts {
        RequestCounts(
            self.0
                .iter()
                .map(|(key, n)| (key.clone(), n - before.0.get(key).copied().unwrap_or(0.0)))
                .filter(|(_, n)| *n > 0.0)
                .collect(),
        )
    }

    /// The writes alone, by (verb, resource).
    pub fn only_writes(&self) -> RequestCounts {
        RequestCounts(
            self.0
                .iter()
                .filter(|((verb, _), _)| WRITES.contains(&verb.as_str()))
                .map(|(key, n)| (key.clone(), *n))
                .collect(),
        )
    }

    /// Split by resource: (the rest, the control plane's [`UPKEEP`]).
    pub fn split_upkeep(&self) -> (RequestCounts, RequestCounts) {
        let (upkeep, rest) = self
            .0
            .clone()
            .into_iter()
            .partition(|((_, resource), _)| UPKEEP.contains(&resource.as_str()));
        (RequestCounts(rest), RequestCounts(upkeep))
    }

    /// The count for one verb and resource (0 when none).
    pub fn get(&self, verb: &str, resource: &str) -> f64 {
        self.0
            .get(&(verb.to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0.0)
    }

    /// The writes among them.
    pub fn writes(&self) -> f64 {
        self.0
            .iter()
            .filter(|((verb, _), _)| WRITES.contains(&verb.as_str()))
            .map(|(_, n)| n)
            .sum()
    }

    /// One line per (verb, resource), each also per `per` (tenants, say).
    pub fn table(&self, per: f64) -> Vec<String> {
        self.0
            .iter()
            .map(|((verb, resource), n)| {
                format!("{verb:<8} {resource:<32} {n:>8.0} {:>8.2}", n / per)
            })
            .collect()
    }
}
