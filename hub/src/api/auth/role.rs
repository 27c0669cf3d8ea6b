//! Roles and what each may do.
//!
//! Why permissions and not an order of roles: a two-person rule needs two
//! duties that neither includes the other. An approver reviews what a
//! policy author proposed and must not be able to propose (or a single
//! approver could write and pass a change alone), and the admin manages who
//! may act (tokens, enrollment, revocation, the CA) without being able to
//! change the policy. So each route asks for a [`Permission`], and the one
//! table below says which roles hold it:
//!
//! ```text
//! permission       viewer  operator  policy-author  approver  admin
//! read               x        x           x            x        x
//! operate                     x           x            x        x
//! propose-policy                          x
//! approve-policy                                       x
//! administer                                                    x
//! ```
//!
//! `read` is every GET; `operate` is commands to agents and labels;
//! `propose-policy` is applying a policy (directly under `[api]
//! policy_approval = "single"`, as a proposal under `"two-person"`) and its
//! dry-run; `approve-policy` is approving or rejecting another subject's
//! proposal; `administer` is API tokens, enrollment, revocation and the CA.
//! A role *includes* another when it holds every permission of it
//! ([`Role::includes`]): admin includes operator, not policy-author.

use std::fmt;
use std::str::FromStr;

/// A caller's role. Not ordered on purpose: see the module's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Reads everything.
    Viewer,
    /// Reads, sends commands, sets labels.
    Operator,
    /// An operator who also writes the policy (proposes it, under the
    /// two-person rule).
    PolicyAuthor,
    /// An operator who also approves or rejects another subject's proposal.
    Approver,
    /// An operator who also manages tokens, enrollment, revocation, the CA.
    Admin,
}

/// What a route asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Permission {
    /// Every read.
    Read,
    /// Commands to agents, labels.
    Operate,
    /// Apply a policy (or propose it under the two-person rule), dry-run.
    ProposePolicy,
    /// Approve or reject another subject's proposal.
    ApprovePolicy,
    /// API tokens, enrollment, revocation, the CA.
    Administer,
}

impl Role {
    /// Every role, in the table's order.
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Operator,
        Role::PolicyAuthor,
        Role::Approver,
        Role::Admin,
    ];

    /// The role's name as configs, claims and the CLI write it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::PolicyAuthor => "policy-author",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }

    /// The permissions the role holds: the module's table, row by column.
    pub fn permissions(self) -> &'static [Permission] {
        use Permission::*;
        match self {
            Role::Viewer => &[Read],
            Role::Operator => &[Read, Operate],
            Role::PolicyAuthor => &[Read, Operate, ProposePolicy],
            Role::Approver => &[Read, Operate, ApprovePolicy],
            Role::Admin => &[Read, Operate, Administer],
        }
    }

    /// Whether the role holds `permission`.
    pub fn allows(self, permission: Permission) -> bool {
        self.permissions().contains(&permission)
    }

    /// Whether the role holds every permission of `other`.
    pub fn includes(self, other: Role) -> bool {
        other.permissions().iter().all(|p| self.allows(*p))
    }

    /// The first role of the table's order that holds `permission`, to name
    /// in a refusal ("needs the approver role").
    pub fn least_with(permission: Permission) -> Role {
        Role::ALL
            .into_iter()
            .find(|r| r.allows(permission))
            .unwrap_or(Role::Admin)
    }

    /// Of several roles a caller was given (an OIDC claim with several
    /// groups), the one it acts in: the first of admin, approver,
    /// policy-author, operator, viewer. One subject acts in one role, so
    /// that a person who is both author and approver cannot pass their own
    /// change through the two-person rule by switching hats.
    pub fn acting(roles: impl IntoIterator<Item = Role>) -> Option<Role> {
        const PRECEDENCE: [Role; 5] = [
            Role::Admin,
            Role::Approver,
            Role::PolicyAuthor,
            Role::Operator,
            Role::Viewer,
        ];
        let given: Vec<Role> = roles.into_iter().collect();
        PRECEDENCE.into_iter().find(|r| given.contains(r))
    }
}

impl Permission {
    /// The permission's name, as the docs' table writes it.
    pub fn name(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Operate => "operate",
            Permission::ProposePolicy => "propose-policy",
            Permission::ApprovePolicy => "approve-policy",
            Permission::Administer => "administer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A role name that is none of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not one of viewer, operator, policy-author, approver, admin")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// What a route may ask for: a permission, or (for code that thinks in
/// roles) every permission of a role.
pub trait Need: Copy + fmt::Debug {
    /// Whether `role` satisfies it.
    fn met_by(self, role: Role) -> bool;
    /// The role to name when it is not met.
    fn missing_role(self) -> Role;
    /// The permission to name when it is not met (for a role: its most
    /// specific one).
    fn missing_permission(self) -> Permission;
}

impl Need for Permission {
    fn met_by(self, role: Role) -> bool {
        role.allows(self)
    }
    fn missing_role(self) -> Role {
        Role::least_with(self)
    }
    fn missing_permission(self) -> Permission {
        self
    }
}

impl Need for Role {
    fn met_by(self, role: Role) -> bool {
        role.includes(self)
    }
    fn missing_role(self) -> Role {
        self
    }
    fn missing_permission(self) -> Permission {
        self.permissions()
            .last()
            .copied()
            .unwrap_or(Permission::Read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_separates_writing_approving_and_administering_the_policy() {
        use Permission::*;
        let holders = |p: Permission| -> Vec<&str> {
            Role::ALL
                .into_iter()
                .filter(|r| r.allows(p))
                .map(Role::name)
                .collect()
        };
        assert_eq!(holders(Read).len(), 5);
        assert_eq!(
            holders(Operate),
            ["operator", "policy-author", "approver", "admin"]
        );
        assert_eq!(holders(ProposePolicy), ["policy-author"]);
        assert_eq!(holders(ApprovePolicy), ["approver"]);
        assert_eq!(holders(Administer), ["admin"]);
        assert!(!Role::Approver.includes(Role::PolicyAuthor));
        assert!(!Role::PolicyAuthor.includes(Role::Approver));
        assert!(!Role::Admin.includes(Role::PolicyAuthor));
        assert!(Role::Admin.includes(Role::Operator));
        assert!(Role::PolicyAuthor.includes(Role::Viewer));
        assert!(!Role::Viewer.includes(Role::Operator));
    }

    #[test]
    fn names_read_back_and_unknown_ones_are_refused() {
        for r in Role::ALL {
            assert_eq!(r.name().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
        assert!("Admin".parse::<Role>().is_err());
    }

    #[test]
    fn a_subject_with_several_roles_acts_in_one() {
        assert_eq!(
            Role::acting([Role::PolicyAuthor, Role::Approver]),
            Some(Role::Approver)
        );
        assert_eq!(
            Role::acting([Role::Viewer, Role::Operator]),
            Some(Role::Operator)
        );
        assert_eq!(Role::acting([]), None);
        assert_eq!(Role::least_with(Permission::ApprovePolicy), Role::Approver);
    }
}
