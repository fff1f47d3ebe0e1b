//! The role of a peer, as carried in its certificate.

use std::fmt;
use std::str::FromStr;

use crate::CertError;

/// Prefix of the URI SAN that carries a role: `ringkv:role:<role>`.
pub(crate) const ROLE_URI_PREFIX: &str = "ringkv:role:";

/// What a certificate holder may do in the cluster.
///
/// - `Node`: a storage node; serves data, and may send other nodes the batches of a move it
///   was told to make, gossip and status requests.
/// - `Client`: may only issue client requests (get/put/delete/metadata).
/// - `Admin`: an operator; administers the cluster through the ECS (the only role the ECS
///   answers besides its own), and may read a node's status.
/// - `Ecs`: the External Configuration Service itself; the only role whose signature makes
///   ring metadata valid, and the only one a node takes metadata, locks, transfers, range
///   deletion and start/stop from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A storage node.
    Node,
    /// An application client.
    Client,
    /// An operator administering the cluster through the ECS.
    Admin,
    /// The External Configuration Service: signs ring metadata and drives moves.
    Ecs,
}

impl Role {
    /// All roles, in a fixed order.
    pub const ALL: [Role; 4] = [Role::Node, Role::Client, Role::Admin, Role::Ecs];

    /// Lower-case name: `"node"`, `"client"`, `"admin"` or `"ecs"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Client => "client",
            Role::Admin => "admin",
            Role::Ecs => "ecs",
        }
    }

    /// The URI SAN that carries this role in a certificate, e.g. `ringkv:role:node`.
    pub fn san_uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }

    /// Parses a role URI SAN. `None` if `uri` is not a ringkv role URI at all;
    /// `Some(Err(..))` if it has the ringkv prefix but names no known role.
    pub(crate) fn from_san_uri(uri: &str) -> Option<Result<Role, CertError>> {
        uri.strip_prefix(ROLE_URI_PREFIX).map(str::parse)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| CertError::UnknownRole {
                value: s.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for role in Role::ALL {
            assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
        }
        assert_eq!(Role::Node.to_string(), "node");
        assert_eq!(Role::Client.to_string(), "client");
        assert_eq!(Role::Admin.to_string(), "admin");
        assert_eq!(Role::Ecs.to_string(), "ecs");
    }

    #[test]
    fn parse_rejects_unknown() {
        assert!(matches!(
            "Node".parse::<Role>(),
            Err(CertError::UnknownRole { .. })
        ));
        assert!("".parse::<Role>().is_err());
    }

    #[test]
    fn san_uri_round_trip() {
        assert_eq!(Role::Node.san_uri(), "ringkv:role:node");
        assert_eq!(Role::Client.san_uri(), "ringkv:role:client");
        assert_eq!(Role::Admin.san_uri(), "ringkv:role:admin");
        for role in Role::ALL {
            assert_eq!(Role::from_san_uri(&role.san_uri()).unwrap().unwrap(), role);
        }
        assert!(Role::from_san_uri("https://example.com").is_none());
        assert!(Role::from_san_uri("ringkv:role:root").unwrap().is_err());
    }
}
