//! Which kind of server answered a read (reported to clients in
//! `X-Tally-Node`).

/// A read's server: the group's master or one of its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Master,
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Replica => "replica",
        }
    }
}
