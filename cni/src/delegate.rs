//! Calling another plugin (a delegated IPAM plugin) as the spec says: found on CNI_PATH, same
//! CNI_* environment with CNI_COMMAND set, the network configuration on stdin.

use std::process::Stdio;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::error::{code, CniError};
use crate::spec::CniEnv;

/// Runs plugin `plugin_type` with `command`; returns its parsed stdout (None if empty).
pub async fn run(
    env: &CniEnv,
    plugin_type: &str,
    command: &str,
    stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    if plugin_type.contains('/') {
        return Err(CniError::invalid_config(format!(
            "plugin type {plugin_type:?} must be a bare name"
        )));
    }
    let path = env
        .path
        .iter()
        .map(|d| d.join(plugin_type))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::invalid_config(format!(
                "plugin {plugin_type:?} not found on CNI_PATH {:?}",
                env.path
            ))
        })?;
    let mut child = tokio::process::Command::new(&path)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CniError::io(format!("cannot run {}: {e}", path.display())))?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin)
            .await
            .map_err(|e| CniError::io(format!("writing to {plugin_type}: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| CniError::io(format!("waiting for {plugin_type}: {e}")))?;
    let value: Option<Value> = if out.stdout.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(
            serde_json::from_slice(&out.stdout)
                .map_err(|e| CniError::decode(format!("{plugin_type} output: {e}")))?,
        )
    };
    if !out.status.success() {
        let msg = value
            .as_ref()
            .and_then(|v| v.get("msg"))
            .and_then(Value::as_str)
            .unwrap_or("failed")
            .to_string();
        return Err(CniError::new(
            code::DELEGATE_FAILED,
            format!("{plugin_type} {command}: {msg}"),
        ));
    }
    Ok(value)
}
