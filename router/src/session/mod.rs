//! What a client's session carries from one server connection to the next in transaction
//! pooling, for the relay stage ([`crate::relay`]): its session parameters ([`params`]), set again
//! on each server; the statements it prepared in the protocol ([`prepared`]), prepared again where
//! they are next used; and what its SQL does that cannot move ([`inspect`]), which keeps its
//! server until it leaves.

pub(crate) mod inspect;
pub(crate) mod params;
pub(crate) mod prepared;
