//! Xenstore permissions: `n5` (no access, owner 5), `r0`, `w3`, `b7`.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use crate::types::DomId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    None,
    Read,
    Write,
    Both,
}

impl Access {
    pub fn can_read(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }
    pub fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }
}

/// One permission entry. In a node's list the first entry's domain is the owner and its
/// access is what every domain not listed gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    pub domid: DomId,
    pub access: Access,
}

impl Perm {
    pub fn new(domid: DomId, access: Access) -> Self {
        Perm { domid, access }
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = match self.access {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        };
        write!(f, "{c}{}", self.domid)
    }
}

impl FromStr for Perm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::Invalid(format!(
                "permission {s:?}: expected n|r|w|b followed by a domain id"
            ))
        };
        let mut chars = s.chars();
        let access = match chars.next().ok_or_else(bad)? {
            'n' => Access::None,
            'r' => Access::Read,
            'w' => Access::Write,
            'b' => Access::Both,
            _ => return Err(bad()),
        };
        let domid = chars.as_str().parse().map_err(|_| bad())?;
        Ok(Perm { domid, access })
    }
}

/// The access `dom` has to a node with `perms`; `privileged` callers (dom0) have all.
pub fn access_of(perms: &[Perm], dom: DomId, privileged: bool) -> Access {
    if privileged {
        return Access::Both;
    }
    let Some(owner) = perms.first() else {
        return Access::None;
    };
    if owner.domid == dom {
        return Access::Both;
    }
    perms[1..]
        .iter()
        .find(|p| p.domid == dom)
        .map_or(owner.access, |p| p.access)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print_round_trip() {
        for s in ["n0", "r5", "w12", "b32767"] {
            assert_eq!(s.parse::<Perm>().unwrap().to_string(), s);
        }
        assert!("x1".parse::<Perm>().is_err());
        assert!("r".parse::<Perm>().is_err());
    }

    #[test]
    fn owner_and_default_access() {
        let perms = [Perm::new(3, Access::None), Perm::new(7, Access::Read)];
        assert_eq!(access_of(&perms, 3, false), Access::Both);
        assert_eq!(access_of(&perms, 7, false), Access::Read);
        assert_eq!(access_of(&perms, 9, false), Access::None);
        assert_eq!(access_of(&perms, 9, true), Access::Both);
    }
}
