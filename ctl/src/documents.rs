//! Reading what `apply -f` is given: YAML documents separated by `---`, a JSON document, or
//! the JSON `List` that `get -o json` prints.

use tessera_datastore::yaml::{parse_resources, ResourceError, Resources};

pub fn read(text: &str) -> Result<Resources, ResourceError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(trimmed) {
            if v["kind"] == "List" {
                let docs: Vec<String> = v["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| d.to_string())
                    .collect();
                return parse_resources(&docs.join("\n---\n"));
            }
        }
    }
    parse_resources(text)
}
