//! Choosing a DatabaseServer for a tenant (pure).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};
use silo_crds::Isolation;

/// What placement needs to know about one server.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub dedicated: bool,
    pub cordoned: bool,
    pub ready: bool,
    pub max_tenants: usize,
    pub tenants: usize,
}

/// Why no server fits; `reason` is the condition reason, `message` says what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaceable {
    pub reason: &'static str,
    pub message: String,
}

/// `Shared`: the least-loaded matching, uncordoned, ready, non-dedicated server with capacity.
/// `Dedicated`: a matching, uncordoned, ready, dedicated server with no tenant yet.
pub fn place_tenant(
    isolation: Isolation,
    selector: Option<&LabelSelector>,
    servers: &[Candidate],
) -> Result<String, Unplaceable> {
    let selector = match selector.cloned().map(Selector::try_from).transpose() {
        Ok(selector) => selector,
        Err(e) => {
            return Err(Unplaceable {
                reason: "InvalidSelector",
                message: format!("serverSelector is invalid: {e}"),
            });
        }
    };
    let dedicated = isolation == Isolation::Dedicated;
    let matching: Vec<&Candidate> = servers
        .iter()
        .filter(|s| s.dedicated == dedicated)
        .filter(|s| selector.as_ref().is_none_or(|sel| sel.matches(&s.labels)))
        .collect();
    let kind = if dedicated {
        "dedicated DatabaseServer"
    } else {
        "shared DatabaseServer"
    };
    let selected = if selector.is_some() {
        " matching serverSelector"
    } else {
        ""
    };
    if matching.is_empty() {
        return Err(Unplaceable {
            reason: if dedicated {
                "NoFreeDedicatedServer"
            } else {
                "NoMatchingServer"
            },
            message: format!("no {kind}{selected} exists; add one and the tenant is placed on it"),
        });
    }
    let uncordoned: Vec<&Candidate> = matching.into_iter().filter(|s| !s.cordoned).collect();
    if uncordoned.is_empty() {
        return Err(Unplaceable {
            reason: "ServersCordoned",
            message: format!("every {kind}{selected} is cordoned"),
        });
    }
    let ready: Vec<&Candidate> = uncordoned.into_iter().filter(|s| s.ready).collect();
    if ready.is_empty() {
        return Err(Unplaceable {
            reason: "ServersNotReady",
            message: format!("no {kind}{selected} is Ready; see their Ready conditions"),
        });
    }
    let capacity = |s: &Candidate| if dedicated { 1 } else { s.max_tenants };
    let free: Vec<&Candidate> = ready
        .into_iter()
        .filter(|s| s.tenants < capacity(s))
        .collect();
    free.into_iter()
        .min_by(|a, b| {
            // Least loaded by fraction of capacity, then fewest tenants, then name for a stable choice.
            let load_a = a.tenants as u128 * capacity(b) as u128;
            let load_b = b.tenants as u128 * capacity(a) as u128;
            load_a
                .cmp(&load_b)
                .then(a.tenants.cmp(&b.tenants))
                .then(a.name.cmp(&b.name))
        })
        .map(|s| s.name.clone())
        .ok_or_else(|| Unplaceable {
            reason: if dedicated {
                "NoFreeDedicatedServer"
            } else {
                "ServersFull"
            },
            message: if dedicated {
                format!("every {kind}{selected} already has its tenant")
            } else {
                format!("every {kind}{selected} has reached maxTenants")
            },
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, tenants: usize, max: usize) -> Candidate {
        Candidate {
            name: name.into(),
            labels: BTreeMap::new(),
            dedicated: false,
            cordoned: false,
            ready: true,
            max_tenants: max,
            tenants,
        }
    }

    fn labelled(mut c: Candidate, k: &str, v: &str) -> Candidate {
        c.labels.insert(k.into(), v.into());
        c
    }

    fn selector(k: &str, v: &str) -> LabelSelector {
        LabelSelector {
            match_labels: Some([(k.to_string(), v.to_string())].into()),
            ..Default::default()
        }
    }

    #[test]
    fn shared_takes_the_least_loaded_server() {
        let servers = [server("a", 5, 10), server("b", 2, 10), server("c", 2, 10)];
        assert_eq!(
            place_tenant(Isolation::Shared, None, &servers),
            Ok("b".into())
        );
    }

    #[test]
    fn load_is_a_fraction_of_capacity() {
        let servers = [server("small", 1, 2), server("big", 10, 100)];
        assert_eq!(
            place_tenant(Isolation::Shared, None, &servers),
            Ok("big".into())
        );
    }

    #[test]
    fn reasons_for_no_placement() {
        let cases: Vec<(Isolation, Vec<Candidate>, Option<LabelSelector>, &str)> = vec![
            (Isolation::Shared, vec![], None, "NoMatchingServer"),
            (
                Isolation::Shared,
                vec![server("a", 0, 1)],
                Some(selector("tier", "gold")),
                "NoMatchingServer",
            ),
            (
                Isolation::Shared,
                vec![server("a", 3, 3)],
                None,
                "ServersFull",
            ),
            (
                Isolation::Shared,
                vec![Candidate {
                    cordoned: true,
                    ..server("a", 0, 3)
                }],
                None,
                "ServersCordoned",
            ),
            (
                Isolation::Shared,
                vec![Candidate {
                    ready: false,
                    ..server("a", 0, 3)
                }],
                None,
                "ServersNotReady",
            ),
            (
                Isolation::Dedicated,
                vec![server("a", 0, 3)],
                None,
                "NoFreeDedicatedServer",
            ),
            (
                Isolation::Dedicated,
                vec![Candidate {
                    dedicated: true,
                    ..server("d", 1, 1)
                }],
                None,
                "NoFreeDedicatedServer",
            ),
        ];
        for (isolation, servers, sel, reason) in cases {
            let got = place_tenant(isolation, sel.as_ref(), &servers);
            assert_eq!(
                got.as_ref().err().map(|e| e.reason),
                Some(reason),
                "{isolation:?} {servers:?}"
            );
        }
    }

    #[test]
    fn selector_filters_servers() {
        let servers = [
            labelled(server("eu", 9, 10), "region", "eu"),
            labelled(server("us", 0, 10), "region", "us"),
        ];
        assert_eq!(
            place_tenant(Isolation::Shared, Some(&selector("region", "eu")), &servers),
            Ok("eu".into())
        );
    }

    #[test]
    fn dedicated_takes_a_free_dedicated_server_and_shared_never_does() {
        let servers = [
            Candidate {
                dedicated: true,
                ..server("d1", 1, 1)
            },
            Candidate {
                dedicated: true,
                ..server("d2", 0, 1)
            },
            server("shared", 0, 10),
        ];
        assert_eq!(
            place_tenant(Isolation::Dedicated, None, &servers),
            Ok("d2".into())
        );
        let only_dedicated = [Candidate {
            dedicated: true,
            ..server("d2", 0, 1)
        }];
        assert_eq!(
            place_tenant(Isolation::Shared, None, &only_dedicated)
                .err()
                .map(|e| e.reason),
            Some("NoMatchingServer")
        );
    }

    #[test]
    fn invalid_selector_is_reported() {
        let bad = LabelSelector {
            match_expressions: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                    key: "a".into(),
                    operator: "Sometimes".into(),
                    values: None,
                },
            ]),
            ..Default::default()
        };
        let got = place_tenant(Isolation::Shared, Some(&bad), &[server("a", 0, 1)]);
        assert_eq!(got.err().map(|e| e.reason), Some("InvalidSelector"));
    }
}
