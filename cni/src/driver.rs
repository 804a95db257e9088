//! The runtime side of CNI 1.1: what kubelet's container runtime does with a conflist.
//! Debian's runtimes stop at spec 1.0, so Tessera's tests, lab and benchmarks drive plugins
//! with this: ADD through the chain (each plugin gets the previous result as `prevResult`),
//! DEL in reverse order with the cached result, CHECK, STATUS and GC (with
//! `cni.dev/valid-attachments`), VERSION.
//!
//! Plugins run as child processes, optionally inside a node's network namespace
//! (`nsenter --net=<path>`, which, unlike `ip netns exec`, leaves /sys and cgroups alone).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("plugin {plugin} {command} failed with code {code}: {msg} {details}")]
    Plugin {
        plugin: String,
        command: String,
        code: u64,
        msg: String,
        details: String,
    },
    #[error("plugin {plugin} {command}: {reason}")]
    Exec {
        plugin: String,
        command: String,
        reason: String,
    },
    #[error("invalid conflist: {0}")]
    Conflist(String),
}

impl DriverError {
    /// The CNI error code, for plugin errors.
    pub fn code(&self) -> Option<u64> {
        match self {
            DriverError::Plugin { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// One pod interface as the runtime sees it.
#[derive(Debug, Clone, Default)]
pub struct Attachment {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS, e.g. K8S_POD_NAMESPACE, K8S_POD_NAME, IP.
    pub args: BTreeMap<String, String>,
    /// runtimeConfig values by capability (`ips`, `mac`, `portMappings`, `bandwidth`); each
    /// plugin receives only those it declares in `capabilities`.
    pub capability_args: Map<String, Value>,
}

/// A network configuration list and where to find its plugins.
#[derive(Debug, Clone)]
pub struct Driver {
    pub cni_version: String,
    pub name: String,
    pub plugins: Vec<Value>,
    pub bin_dirs: Vec<PathBuf>,
    /// Run plugins in this network namespace (a path such as /run/netns/node1).
    pub netns: Option<String>,
}

impl Driver {
    pub fn from_conflist(conflist: &Value, bin_dirs: Vec<PathBuf>) -> Result<Self, DriverError> {
        let s = |k: &str| conflist.get(k).and_then(Value::as_str).map(str::to_string);
        let plugins = conflist
            .get("plugins")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
            .cloned()
            .ok_or_else(|| DriverError::Conflist("`plugins` must be a non-empty list".into()))?;
        Ok(Driver {
            cni_version: s("cniVersion")
                .ok_or_else(|| DriverError::Conflist("no cniVersion".into()))?,
            name: s("name").ok_or_else(|| DriverError::Conflist("no name".into()))?,
            plugins,
            bin_dirs,
            netns: None,
        })
    }

    pub fn in_netns(mut self, netns: impl Into<String>) -> Self {
        self.netns = Some(netns.into());
        self
    }

    fn plugin_config(&self, plugin: &Value, att: &Attachment, prev: Option<&Value>) -> Value {
        let mut conf = plugin.as_object().cloned().unwrap_or_default();
        conf.insert("cniVersion".into(), json!(self.cni_version));
        conf.insert("name".into(), json!(self.name));
        if let Some(p) = prev {
            conf.insert("prevResult".into(), p.clone());
        }
        let caps = plugin.get("capabilities").and_then(Value::as_object);
        let runtime: Map<String, Value> = att
            .capability_args
            .iter()
            .filter(|(k, _)| caps.and_then(|c| c.get(*k)).and_then(Value::as_bool) == Some(true))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !runtime.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        Value::Object(conf)
    }

    /// Runs one plugin; returns its parsed stdout (None when empty).
    pub fn exec(
        &self,
        plugin_type: &str,
        command: &str,
        att: &Attachment,
        stdin: &Value,
    ) -> Result<Option<Value>, DriverError> {
        let bin = self
            .bin_dirs
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.is_file())
            .ok_or_else(|| DriverError::Exec {
                plugin: plugin_type.into(),
                command: command.into(),
                reason: format!("not found in {:?}", self.bin_dirs),
            })?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={ns}")).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let path = std::env::join_paths(&self.bin_dirs).unwrap_or_default();
        let args: Vec<String> = att.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", args.join(";"))
            .env("CNI_PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let err = |reason: String| DriverError::Exec {
            plugin: plugin_type.into(),
            command: command.into(),
            reason,
        };
        let mut child = cmd.spawn().map_err(|e| err(format!("spawn: {e}")))?;
        if let Some(mut input) = child.stdin.take() {
            input
                .write_all(stdin.to_string().as_bytes())
                .map_err(|e| err(format!("stdin: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| err(format!("wait: {e}")))?;
        let parsed: Option<Value> = if out.stdout.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            Some(serde_json::from_slice(&out.stdout).map_err(|e| {
                err(format!(
                    "stdout is not JSON ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                ))
            })?)
        };
        if !out.status.success() {
            let v = parsed.unwrap_or(Value::Null);
            return Err(DriverError::Plugin {
                plugin: plugin_type.into(),
                command: command.into(),
                code: v.get("code").and_then(Value::as_u64).unwrap_or(0),
                msg: v
                    .get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                details: format!(
                    "{} (stderr: {})",
                    v.get("details").and_then(Value::as_str).unwrap_or_default(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(parsed)
    }

    fn plugin_type(plugin: &Value) -> Result<String, DriverError> {
        plugin
            .get("type")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| DriverError::Conflist("a plugin has no type".into()))
    }

    /// ADD through the chain; returns the last plugin's result (what the runtime caches).
    pub fn add(&self, att: &Attachment) -> Result<Value, DriverError> {
        let mut prev: Option<Value> = None;
        for p in &self.plugins {
            let conf = self.plugin_config(p, att, prev.as_ref());
            let ty = Self::plugin_type(p)?;
            let out = self.exec(&ty, "ADD", att, &conf)?;
            prev = Some(out.ok_or_else(|| DriverError::Exec {
                plugin: ty,
                command: "ADD".into(),
                reason: "printed no result".into(),
            })?);
        }
        prev.ok_or_else(|| DriverError::Conflist("no plugins".into()))
    }

    /// DEL in reverse order, each plugin given the cached ADD result (if any).
    pub fn del(&self, att: &Attachment, cached: Option<&Value>) -> Result<(), DriverError> {
        for p in self.plugins.iter().rev() {
            let conf = self.plugin_config(p, att, cached);
            self.exec(&Self::plugin_type(p)?, "DEL", att, &conf)?;
        }
        Ok(())
    }

    pub fn check(&self, att: &Attachment, cached: &Value) -> Result<(), DriverError> {
        for p in &self.plugins {
            let conf = self.plugin_config(p, att, Some(cached));
            self.exec(&Self::plugin_type(p)?, "CHECK", att, &conf)?;
        }
        Ok(())
    }

    /// STATUS of every plugin (spec 1.1).
    pub fn status(&self) -> Result<(), DriverError> {
        let att = Attachment::default();
        for p in &self.plugins {
            let conf = self.plugin_config(p, &att, None);
            self.exec(&Self::plugin_type(p)?, "STATUS", &att, &conf)?;
        }
        Ok(())
    }

    /// GC (spec 1.1): every plugin learns which attachments are still valid.
    pub fn gc(&self, valid: &[(String, String)]) -> Result<(), DriverError> {
        let att = Attachment::default();
        let list: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({ "containerID": c, "ifname": i }))
            .collect();
        for p in &self.plugins {
            let mut conf = self.plugin_config(p, &att, None);
            if let Some(o) = conf.as_object_mut() {
                o.insert(
                    "cni.dev/valid-attachments".into(),
                    Value::Array(list.clone()),
                );
            }
            self.exec(&Self::plugin_type(p)?, "GC", &att, &conf)?;
        }
        Ok(())
    }

    /// VERSION of one plugin.
    pub fn version(&self, plugin_type: &str) -> Result<Value, DriverError> {
        let att = Attachment::default();
        self.exec(
            plugin_type,
            "VERSION",
            &att,
            &json!({ "cniVersion": self.cni_version }),
        )?
        .ok_or_else(|| DriverError::Exec {
            plugin: plugin_type.into(),
            command: "VERSION".into(),
            reason: "printed nothing".into(),
        })
    }
}
