//! The `remoca up` config file: TOML, every key optional.
//!
//! The defaults are the embedded `default.toml` itself: the user's file is laid over it
//! key by key and the result is checked with `deny_unknown_fields`, so the documented file
//! and the defaults cannot drift apart and a misspelt key is named in the error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// The embedded defaults, printed by `remoca up --print-config`.
pub const DEFAULT: &str = include_str!("default.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub host: HostSection,
    pub memserver: MemserverSection,
    pub blkback: BlkbackSection,
    pub pager: PagerSection,
    pub wss: WssSection,
}

/// Working-set estimation (`remoca_paging::mrc::live`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WssSection {
    pub enabled: bool,
    /// Seconds between estimates published in xenstore.
    pub interval: f64,
    pub rate: f64,
    pub max_samples: usize,
    pub tolerance: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagerSection {
    pub enabled: bool,
    pub domains: Vec<String>,
    #[serde(deserialize_with = "optional_size")]
    pub target: Option<u64>,
    #[serde(deserialize_with = "size")]
    pub demo_size: u64,
    #[serde(deserialize_with = "size")]
    pub demo_target: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    pub backend: String,
    pub state_dir: PathBuf,
    pub sim_xenstore_socket: PathBuf,
    pub status_interval: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemserverSection {
    pub enabled: bool,
    pub listen: SocketAddr,
    #[serde(deserialize_with = "size")]
    pub capacity: u64,
    #[serde(deserialize_with = "size")]
    pub headroom: u64,
    pub key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlkbackSection {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub blkif: bool,
    /// `"self"`, or the domid whose `backend/vbd3` the blkif backend serves.
    pub backend_domain: String,
    pub memservers: Vec<SocketAddr>,
    #[serde(deserialize_with = "size")]
    pub demo_swap: u64,
    #[serde(default)]
    pub swap: Vec<SwapSection>,
    #[serde(deserialize_with = "size")]
    pub demo_disk: u64,
    #[serde(default)]
    pub export: Vec<ExportSection>,
    pub failover: FailoverSection,
}

/// How exports with `failover = true` are served.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverSection {
    pub heartbeat_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub bound_floor_ms: u64,
    pub kill_local: bool,
    pub fence: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    pub name: String,
    pub template: PathBuf,
    pub overlay: Option<PathBuf>,
    #[serde(default)]
    pub readonly: bool,
    /// Keep blocks the guest re-reads in the memory servers' ephemeral pool.
    #[serde(default)]
    pub remote_cache: bool,
    /// The guest (name or id) whose working-set estimate this disk's reads feed.
    #[serde(default)]
    pub domain: Option<String>,
    /// Serve it through a failover endpoint and two driver processes.
    #[serde(default)]
    pub failover: bool,
    /// With `failover`: the CPU of the endpoint's and the drivers' channel readers.
    #[serde(default)]
    pub reader_cpu: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapSection {
    pub name: String,
    #[serde(deserialize_with = "size")]
    pub size: u64,
    pub spill: PathBuf,
    #[serde(default, deserialize_with = "optional_size")]
    pub spill_max: Option<u64>,
    /// The guest (name or id) whose working-set estimate this swap device feeds.
    #[serde(default)]
    pub domain: Option<String>,
}

fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = String::deserialize(d)?;
    remoca_memserver::byte_size::parse_size(&s).map_err(serde::de::Error::custom)
}

fn optional_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    remoca_memserver::byte_size::parse_size(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

impl Config {
    /// The defaults alone.
    pub fn default_config() -> anyhow::Result<Config> {
        Config::from_str_over_defaults("", Path::new("<defaults>"))
    }

    /// Read `path` and lay it over the defaults.
    ///
    /// # Errors
    /// Unreadable file, TOML syntax, an unknown key (named), or a bad value.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Config::from_str_over_defaults(&text, path)
    }

    fn from_str_over_defaults(text: &str, origin: &Path) -> anyhow::Result<Config> {
        let mut base: toml::Table = toml::from_str(DEFAULT).context("embedded default config")?;
        let user: toml::Table = toml::from_str(text)
            .with_context(|| format!("{}: not valid TOML", origin.display()))?;
        merge(&mut base, user, "").with_context(|| format!("{}: bad config", origin.display()))?;
        let cfg: Config = toml::Value::Table(base)
            .try_into()
            .with_context(|| format!("{}: bad config", origin.display()))?;
        cfg.check()
            .with_context(|| format!("{}: bad config", origin.display()))?;
        Ok(cfg)
    }

    fn check(&self) -> anyhow::Result<()> {
        if !(self.host.status_interval > 0.0 && self.host.status_interval <= 3600.0) {
            bail!("host.status_interval must be between 0 and 3600 seconds");
        }
        self.host
            .backend
            .parse::<remoca_xen::BackendChoice>()
            .context("host.backend")?;
        if self.memserver.enabled && self.memserver.capacity == 0 {
            bail!("memserver.capacity must be more than 0");
        }
        let w = &self.wss;
        if !(w.interval > 0.0 && w.interval <= 3600.0) {
            bail!("wss.interval must be between 0 and 3600 seconds");
        }
        if !(w.rate > 0.0 && w.rate <= 1.0) || w.max_samples == 0 {
            bail!("wss.rate must be in (0, 1] and wss.max_samples at least 1");
        }
        if !(w.tolerance > 0.0 && w.tolerance < 1.0) {
            bail!("wss.tolerance must be between 0 and 1");
        }
        for e in &self.blkback.export {
            if let Some(cpu) = e.reader_cpu {
                if !e.failover {
                    bail!(
                        "blkback.export {:?}: reader_cpu needs failover = true",
                        e.name
                    );
                }
                remoca_blkback::failover::affinity::check_cpu(cpu)
                    .with_context(|| format!("blkback.export {:?}", e.name))?;
            }
            if e.failover && e.remote_cache {
                bail!(
                    "blkback.export {:?}: failover and remote_cache cannot be combined yet",
                    e.name
                );
            }
        }
        let f = &self.blkback.failover;
        if f.heartbeat_ms == 0 || f.heartbeat_timeout_ms <= f.heartbeat_ms {
            bail!("blkback.failover: heartbeat_timeout_ms must be more than heartbeat_ms (> 0)");
        }
        let p = &self.pager;
        if p.demo_size < 1 << 20 || p.demo_target == 0 || p.demo_target > p.demo_size {
            bail!(
                "pager: demo_size must be at least 1M and demo_target between 1 byte and demo_size"
            );
        }
        Ok(())
    }
}

/// Lay `user` over `base`. Tables merge; anything else replaces. A key the defaults do not
/// have is an error naming its full path (arrays of tables such as `blkback.export` are
/// checked by the typed parse instead).
fn merge(base: &mut toml::Table, user: toml::Table, prefix: &str) -> anyhow::Result<()> {
    for (key, value) in user {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) => merge(b, u, &path)?,
            (Some(toml::Value::Table(_)), _) => bail!("`{path}` must be a table"),
            (Some(slot), v) => *slot = v,
            (None, v @ toml::Value::Array(_))
                if path == "blkback.export" || path == "blkback.swap" =>
            {
                base.insert(key, v);
            }
            (None, _) => bail!("unknown key `{path}`"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<Config> {
        Config::from_str_over_defaults(text, Path::new("test.toml"))
    }

    #[test]
    fn defaults_parse_and_user_keys_override() {
        let d = Config::default_config().unwrap();
        assert_eq!(d.host.backend, "auto");
        assert_eq!(d.memserver.capacity, 256 << 20);
        assert!(d.wss.enabled && d.wss.interval == 5.0);
        let c = parse(
            "[memserver]\ncapacity = \"1G\"\n[[blkback.export]]\nname = \"a\"\ntemplate = \"/t\"\n",
        )
        .unwrap();
        assert_eq!(c.memserver.capacity, 1 << 30);
        assert_eq!(c.memserver.headroom, d.memserver.headroom);
        assert_eq!(c.blkback.export.len(), 1);
    }

    #[test]
    fn errors_name_the_offending_key() {
        let msg = |t: &str| format!("{:#}", parse(t).unwrap_err());
        assert!(msg("[memserver]\ncapcity = \"1G\"\n").contains("memserver.capcity"));
        assert!(msg("[nosuch]\n").contains("nosuch"));
        assert!(msg("[memserver]\ncapacity = \"lots\"\n").contains("lots"));
        assert!(msg("[host]\nbackend = \"kvm\"\n").contains("host.backend"));
        assert!(msg("[[blkback.export]]\nname = \"a\"\ntemplat = \"/t\"\n").contains("templat"));
        assert!(msg("[memserver\n").contains("not valid TOML"));
        assert!(msg("[wss]\ninterval = 0.0\n").contains("wss.interval"));
        assert!(msg("[wss]\nrate = 2.0\n").contains("wss.rate"));
        assert!(
            msg("[blkback.failover]\nheartbeat_timeout_ms = 50\n").contains("heartbeat_timeout_ms")
        );
        assert!(msg("[blkback.failover]\nkill = true\n").contains("blkback.failover.kill"));
        let both = "[[blkback.export]]\nname = \"a\"\ntemplate = \"/t\"\nfailover = true\n\
                    remote_cache = true\n";
        assert!(msg(both).contains("cannot be combined"));
        let c = parse("[[blkback.export]]\nname = \"a\"\ntemplate = \"/t\"\nfailover = true\n")
            .unwrap();
        assert!(c.blkback.export[0].failover && c.blkback.failover.fence);
        let export =
            |extra: &str| format!("[[blkback.export]]\nname = \"a\"\ntemplate = \"/t\"\n{extra}");
        let cpu = remoca_blkback::failover::affinity::first_allowed_cpu().unwrap();
        let c = parse(&export(&format!("failover = true\nreader_cpu = {cpu}\n"))).unwrap();
        assert_eq!(c.blkback.export[0].reader_cpu, Some(cpu));
        assert!(msg(&export("reader_cpu = 0\n")).contains("needs failover = true"));
        let far = msg(&export("failover = true\nreader_cpu = 100000\n"));
        assert!(far.contains("blkback.export \"a\"") && far.contains("reader CPU 100000"));
    }
}
