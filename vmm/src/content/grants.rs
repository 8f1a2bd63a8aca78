//! Which content IDs a VM may fetch, how often, and until when.
//!
//! Grants belong to the running VM: a snapshot does not save them, so each
//! VM restored from one snapshot serves only what its own command line and
//! control socket grant.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::ContentId;

/// What a grant allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantLimits {
    /// Requests it serves before it is gone; `None`: any number.
    pub uses: Option<u64>,
    /// How long after it was given it is gone; `None`: never.
    pub expires_after: Option<Duration>,
}

/// One grant.
#[derive(Clone, Debug)]
struct Grant {
    uses_left: Option<u64>,
    expires: Option<Instant>,
    served: u64,
}

impl Grant {
    fn live(&self, now: Instant) -> bool {
        self.uses_left != Some(0) && self.expires.is_none_or(|t| now < t)
    }
}

/// A grant as `stasis content grants` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GrantInfo {
    /// The ID.
    pub id: String,
    /// Requests left; `None`: no limit.
    pub uses_left: Option<u64>,
    /// Milliseconds until it expires; `None`: never.
    pub expires_in_ms: Option<u64>,
    /// Requests it served.
    pub served: u64,
}

/// The grants of one VM.
#[derive(Debug, Default)]
pub struct Grants {
    map: HashMap<ContentId, Grant>,
}

impl Grants {
    /// No grants.
    pub fn new() -> Self {
        Grants::default()
    }

    /// Grants `id` from `now` on, replacing an earlier grant of it.
    pub fn grant(&mut self, id: ContentId, limits: GrantLimits, now: Instant) {
        let expires = limits.expires_after.map(|d| now.checked_add(d).unwrap_or(now + Duration::from_secs(1 << 40)));
        self.map.insert(id, Grant { uses_left: limits.uses, expires, served: 0 });
    }

    /// Takes the grant of `id` away; false if there was none.
    pub fn revoke(&mut self, id: &ContentId) -> bool {
        self.map.remove(id).is_some()
    }

    /// Whether `id` may be served now.
    pub fn allows(&self, id: &ContentId, now: Instant) -> bool {
        self.map.get(id).is_some_and(|g| g.live(now))
    }

    /// Spends one use of the grant of `id`; false (and nothing spent) if
    /// it may not be served now. A grant whose last use this was is gone.
    pub fn spend(&mut self, id: &ContentId, now: Instant) -> bool {
        let Some(grant) = self.map.get_mut(id) else { return false };
        if !grant.live(now) {
            self.map.remove(id);
            return false;
        }
        grant.served += 1;
        if let Some(left) = grant.uses_left.as_mut() {
            *left -= 1;
            if *left == 0 {
                self.map.remove(id);
            }
        }
        true
    }

    /// The live grants by ID; expired and used-up grants are dropped.
    pub fn list(&mut self, now: Instant) -> Vec<GrantInfo> {
        self.map.retain(|_, g| g.live(now));
        let mut list: Vec<(ContentId, GrantInfo)> = self
            .map
            .iter()
            .map(|(id, g)| {
                let info = GrantInfo {
                    id: id.to_string(),
                    uses_left: g.uses_left,
                    expires_in_ms: g
                        .expires
                        .map(|t| u64::try_from(t.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)),
                    served: g.served,
                };
                (*id, info)
            })
            .collect();
        list.sort_by_key(|(id, _)| *id);
        list.into_iter().map(|(_, info)| info).collect()
    }
}

/// Parses a `--grant` value, `ID[,uses=N][,expires=SECONDS]`; the error
/// is the sentence for the user.
pub fn parse_grant_spec(spec: &str) -> Result<(ContentId, GrantLimits), String> {
    let mut parts = spec.split(',');
    let id: ContentId = parts.next().unwrap_or_default().parse().map_err(|e: super::BadId| e.to_string())?;
    let mut limits = GrantLimits::default();
    for part in parts {
        let number = |value: &str| -> Result<u64, String> {
            match value.parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("invalid --grant {spec:?}: {part:?} needs a whole number of at least 1")),
            }
        };
        match part.split_once('=') {
            Some(("uses", value)) if limits.uses.is_none() => limits.uses = Some(number(value)?),
            Some(("expires", value)) if limits.expires_after.is_none() => {
                limits.expires_after = Some(Duration::from_secs(number(value)?));
            }
            _ => return Err(format!("invalid --grant {spec:?}: expected ID[,uses=N][,expires=SECONDS]")),
        }
    }
    Ok((id, limits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_specs_parse() {
        let id = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(parse_grant_spec(id).expect("plain").1, GrantLimits::default());
        let (_, limits) = parse_grant_spec(&format!("{id},uses=3,expires=60")).expect("limited");
        assert_eq!(limits, GrantLimits { uses: Some(3), expires_after: Some(Duration::from_secs(60)) });
        for bad in [
            "sha256:xyz".to_owned(),
            format!("{id},uses=0"),
            format!("{id},uses=-1"),
            format!("{id},uses=2,uses=3"),
            format!("{id},color=red"),
            format!("{id},"),
        ] {
            assert!(parse_grant_spec(&bad).is_err(), "{bad:?} accepted");
        }
    }

    fn id(n: u8) -> ContentId {
        ContentId::from_digest([n; 32])
    }

    #[test]
    fn use_limited_grant_serves_n_times() {
        let mut grants = Grants::new();
        let now = Instant::now();
        grants.grant(id(1), GrantLimits { uses: Some(2), expires_after: None }, now);
        assert!(grants.allows(&id(1), now));
        assert!(grants.spend(&id(1), now));
        assert_eq!(grants.list(now)[0].uses_left, Some(1));
        assert!(grants.spend(&id(1), now));
        assert!(!grants.allows(&id(1), now));
        assert!(!grants.spend(&id(1), now));
        assert!(grants.list(now).is_empty());
    }

    #[test]
    fn grants_expire_and_can_be_revoked_or_replaced() {
        let mut grants = Grants::new();
        let now = Instant::now();
        let limits = GrantLimits { uses: None, expires_after: Some(Duration::from_secs(10)) };
        grants.grant(id(1), limits, now);
        grants.grant(id(2), GrantLimits::default(), now);
        assert!(grants.allows(&id(1), now + Duration::from_secs(9)));
        assert!(!grants.allows(&id(1), now + Duration::from_secs(10)));
        assert!(!grants.spend(&id(1), now + Duration::from_secs(11)));
        assert!(!grants.allows(&id(3), now), "never granted");
        assert!(grants.spend(&id(2), now));
        let list = grants.list(now);
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].served, list[0].uses_left, list[0].expires_in_ms), (1, None, None));
        assert!(grants.revoke(&id(2)));
        assert!(!grants.revoke(&id(2)));
        assert!(!grants.allows(&id(2), now));
        // Granting again replaces: a used-up grant comes back.
        grants.grant(id(1), GrantLimits { uses: Some(1), expires_after: None }, now);
        assert!(grants.spend(&id(1), now + Duration::from_secs(60)));
    }
}
