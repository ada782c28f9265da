//! The file format, as serde reads it. `deny_unknown_fields` everywhere: a typo is an error.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct File {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub on: Vec<TriggerSpec>,
    #[serde(default)]
    pub inputs: BTreeMap<String, InputSpec>,
    #[serde(default)]
    pub steps: Vec<StepSpec>,
    #[serde(default)]
    pub outputs: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TriggerSpec {
    #[serde(rename = "type")]
    pub ty: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InputSpec {
    #[serde(rename = "type", default)]
    pub ty: InputType,
    #[serde(default)]
    pub default: Option<Value>,
    #[serde(default = "yes")]
    pub required: bool,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "documentation only, shown by `baton workflows show`"
    )]
    pub description: String,
}

fn yes() -> bool {
    true
}

/// The type of a workflow input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputType {
    #[default]
    Any,
    String,
    Number,
    Boolean,
    Object,
    Array,
}

impl InputType {
    pub fn accepts(self, v: &Value) -> bool {
        match self {
            InputType::Any => true,
            InputType::String => v.is_string(),
            InputType::Number => v.is_number(),
            InputType::Boolean => v.is_boolean(),
            InputType::Object => v.is_object(),
            InputType::Array => v.is_array(),
        }
    }
}

impl fmt::Display for InputType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InputType::Any => "any value",
            InputType::String => "string",
            InputType::Number => "number",
            InputType::Boolean => "boolean",
            InputType::Object => "object",
            InputType::Array => "array",
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StepSpec {
    pub id: String,
    pub uses: String,
    #[serde(default)]
    pub with: Value,
    #[serde(default)]
    pub needs: Option<Vec<String>>,
    #[serde(rename = "if", default)]
    pub condition: Option<String>,
}
