//! Who may call the API. Today only the roles an API key carries; token checks and tenant
//! scoping are added here.

use serde::{Deserialize, Serialize};

/// The role of an API key: what its holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Submits and follows its tenant's batches.
    Client,
    /// Claims and reports on items of the pull queues it is allowed.
    Worker,
    /// Sees every tenant; pauses and resumes queues.
    Admin,
}

impl Role {
    /// Every role, in the order the docs list them.
    pub const ALL: &'static [Role] = &[Role::Client, Role::Worker, Role::Admin];

    /// The one spelling of this role, as in the config file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = batchd_domain::ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .iter()
            .copied()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| batchd_domain::ParseEnumError {
                what: "role",
                value: s.to_owned(),
                expected: &["client", "worker", "admin"],
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_have_one_spelling() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(*role));
            assert_eq!(
                serde_json::to_value(role).expect("a role serializes"),
                serde_json::Value::from(role.as_str())
            );
        }
        let err = "owner".parse::<Role>().expect_err("not a role");
        assert_eq!(
            err.to_string(),
            "invalid role `owner`: expected one of client, worker, admin"
        );
    }
}
