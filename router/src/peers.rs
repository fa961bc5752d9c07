//! A router's replicas, found through the EndpointSlices of their Service, for what one replica
//! cannot do alone: the Service sends each connection to any replica, so a cancel request often
//! reaches one that does not hold the client; and a server's connection budget must hold across
//! all of them.
//!
//! Each replica tags the cancel keys it hands out with a number derived from its pod IP. A cancel
//! request carrying another replica's tag is passed on, unchanged, to the replicas with that tag;
//! the key's random part says which client. A server's budget is divided by the number of
//! replicas ([`crate::pools::budget`]).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use sha2::Digest;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The largest tag: tags fill bits 16..31 of the pid, which stays positive.
const MAX_TAG: u16 = 0x7FFF;

/// A replica's tag, from its pod IP: the same on every replica that computes it.
pub fn tag_of(ip: IpAddr) -> u16 {
    let digest = sha2::Sha256::digest(ip.to_string().as_bytes());
    u16::from_be_bytes([digest[0], digest[1]]) % MAX_TAG + 1
}

/// The tag of the replica that handed out a cancel key.
pub fn tag_in(pid: i32) -> u16 {
    (pid as u32 >> 16) as u16
}

/// A pid tagged for `tag`, with 16 random bits below.
fn tagged_pid(tag: u16, low: u16) -> i32 {
    (i32::from(tag) << 16) | i32::from(low)
}

/// What the EndpointSlices say of the other replicas.
#[derive(Debug, Default, PartialEq, Eq)]
struct View {
    /// Their PostgreSQL addresses, with their tags.
    others: Vec<(u16, SocketAddr)>,
}

/// This replica and the others.
pub struct Peers {
    own_tag: u16,
    own_ip: Option<IpAddr>,
    view: ArcSwap<View>,
    replicas: AtomicUsize,
}

impl Peers {
    /// A router on its own (no Service to learn replicas from): a random tag, one replica.
    pub fn alone() -> Self {
        use rand::Rng;
        Peers {
            own_tag: rand::rng().random_range(1..=MAX_TAG),
            own_ip: None,
            view: ArcSwap::from_pointee(View::default()),
            replicas: AtomicUsize::new(1),
        }
    }

    /// A replica with this pod IP; the others come with [`Peers::update`].
    pub fn at(own_ip: IpAddr) -> Self {
        Peers {
            own_tag: tag_of(own_ip),
            own_ip: Some(own_ip),
            view: ArcSwap::from_pointee(View::default()),
            replicas: AtomicUsize::new(1),
        }
    }

    /// How many replicas share each server's budget, this one included (at least 1).
    pub fn replicas(&self) -> usize {
        self.replicas.load(Ordering::Relaxed)
    }

    /// A fresh cancel key (pid, secret) carrying this replica's tag.
    pub fn cancel_key(&self) -> (i32, i32) {
        use rand::Rng;
        let mut rng = rand::rng();
        (tagged_pid(self.own_tag, rng.random()), rng.random())
    }

    /// Whether this replica handed out the cancel key with this pid.
    pub fn is_own(&self, pid: i32) -> bool {
        tag_in(pid) == self.own_tag
    }

    /// The other replicas that may have handed out the cancel key with this pid (one, unless two
    /// pod IPs share a tag).
    pub fn owners_of(&self, pid: i32) -> Vec<SocketAddr> {
        let tag = tag_in(pid);
        self.view
            .load()
            .others
            .iter()
            .filter(|(t, _)| *t == tag)
            .map(|(_, addr)| *addr)
            .collect()
    }

    /// Puts in force the replicas' addresses the EndpointSlices list (this one's among them or
    /// not yet), whatever their readiness: a replica that is starting or draining holds server
    /// connections and clients too.
    pub fn update(&self, endpoints: impl IntoIterator<Item = SocketAddr>) {
        // One family: a dual-stack Service lists every replica once per family.
        let family = |addr: &SocketAddr| {
            self.own_ip
                .is_none_or(|own| own.is_ipv4() == addr.is_ipv4())
        };
        let all: BTreeSet<SocketAddr> = endpoints.into_iter().filter(family).collect();
        let others: Vec<(u16, SocketAddr)> = all
            .iter()
            .filter(|addr| Some(addr.ip()) != self.own_ip)
            .map(|addr| (tag_of(addr.ip()), *addr))
            .collect();
        let replicas = others
            .iter()
            .map(|(_, addr)| addr.ip())
            .collect::<BTreeSet<_>>()
            .len()
            + 1;
        if self.replicas.swap(replicas, Ordering::Relaxed) != replicas {
            info!(
                replicas,
                "router replicas changed; each server's budget is divided among them"
            );
        }
        self.view.store(Arc::new(View { others }));
    }
}

/// The addresses of the PostgreSQL port (named `port_name`) of every endpoint in the slices.
fn endpoints<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port_name: &str,
) -> Vec<SocketAddr> {
    let mut found = Vec::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port_name))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    found.push(SocketAddr::new(ip, port));
                }
            }
        }
    }
    found
}

/// Follows the EndpointSlices of `service` in `namespace` until `shutdown`; `listed` is
/// cancelled once the first list is in force.
pub async fn watch(
    client: Client,
    namespace: String,
    service: String,
    port_name: String,
    peers: Arc<Peers>,
    listed: CancellationToken,
    shutdown: CancellationToken,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    tokio::pin!(stream);
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = stream.next() => event,
        };
        match event {
            Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
            Some(Ok(event)) => {
                let slices = reader.state();
                peers.update(endpoints(slices.iter().map(|s| s.as_ref()), &port_name));
                if matches!(event, watcher::Event::InitDone) {
                    listed.cancel();
                }
            }
            Some(Err(e)) => {
                warn!(error = %e, service = %service, "watching the router's EndpointSlices")
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn cancel_keys_carry_the_replicas_tag_and_stay_positive() {
        let peers = Peers::at("10.0.0.7".parse().unwrap_or_else(|e| panic!("{e}")));
        for _ in 0..1000 {
            let (pid, _) = peers.cancel_key();
            assert!(pid > 0, "pid {pid}");
            assert!(peers.is_own(pid));
            assert_eq!(
                tag_in(pid),
                tag_of("10.0.0.7".parse().unwrap_or_else(|e| panic!("{e}")))
            );
        }
        for ip in ["10.0.0.1", "::1", "255.255.255.255"] {
            let tag = tag_of(ip.parse().unwrap_or_else(|e| panic!("{e}")));
            assert!((1..=MAX_TAG).contains(&tag), "{ip}: {tag}");
            assert_eq!(tag_in(tagged_pid(tag, u16::MAX)), tag);
        }
    }

    #[test]
    fn another_replicas_key_goes_to_that_replica() {
        let (a, b, c) = (
            addr("10.0.0.1:6432"),
            addr("10.0.0.2:6432"),
            addr("10.0.0.3:6432"),
        );
        let peers = Peers::at(a.ip());
        peers.update([a, b, c]);
        assert_eq!(peers.replicas(), 3);
        let from_b = Peers::at(b.ip()).cancel_key().0;
        assert!(!peers.is_own(from_b));
        assert_eq!(peers.owners_of(from_b), vec![b]);
        // Not listed yet: still counted, never a peer of itself.
        peers.update([b]);
        assert_eq!(peers.replicas(), 2);
        // A dual-stack Service lists each replica in both families: counted once.
        peers.update([a, b, addr("[fd00::1]:6432"), addr("[fd00::2]:6432")]);
        assert_eq!(peers.replicas(), 2);
        assert!(peers.owners_of(peers.cancel_key().0).is_empty());
    }

    #[test]
    fn endpoints_of_the_named_port_in_every_slice() {
        let slice = |port: (&str, i32), ips: &[&str]| EndpointSlice {
            ports: Some(vec![
                EndpointPort {
                    name: Some("http".into()),
                    port: Some(8080),
                    ..Default::default()
                },
                EndpointPort {
                    name: Some(port.0.into()),
                    port: Some(port.1),
                    ..Default::default()
                },
            ]),
            endpoints: ips
                .iter()
                .map(|ip| Endpoint {
                    addresses: vec![ip.to_string()],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let slices = [
            slice(("postgres", 6432), &["10.0.0.1", "fd00::2"]),
            slice(("postgres", 7432), &["10.0.0.3"]),
            slice(("other", 5432), &["10.0.0.4"]),
        ];
        assert_eq!(
            endpoints(&slices, "postgres"),
            vec![
                addr("10.0.0.1:6432"),
                addr("[fd00::2]:6432"),
                addr("10.0.0.3:7432")
            ]
        );
    }
}
