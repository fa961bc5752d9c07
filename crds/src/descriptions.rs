//! CRD descriptions as prose. Doc comments are wrapped at 100 columns and schemars keeps their line
//! breaks; `kubectl explain` wraps text itself, so a break inside a paragraph would split a sentence
//! mid-line. Every description of a CRD (doc comments, `#[schemars(description)]`, schema helper
//! functions, printer columns) passes through [`as_prose`] once, in [`crate::all`].

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    JSONSchemaPropsOrStringArray,
};

/// Rewrites every description of `crd` (its schemas at any depth and its printer columns) as prose.
pub(crate) fn crd_as_prose(crd: &mut CustomResourceDefinition) {
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            for_each_schema(schema, &mut |s| {
                if let Some(description) = s.description.as_mut() {
                    *description = as_prose(description);
                }
            });
        }
        for column in version.additional_printer_columns.iter_mut().flatten() {
            if let Some(description) = column.description.as_mut() {
                *description = as_prose(description);
            }
        }
    }
}

/// `text` with the lines of each paragraph joined by a space. Paragraphs stay apart (`"\n\n"`) and
/// list items (lines starting with `- ` or `* `) stay on lines of their own; an indented line that
/// continues a list item joins that item.
pub(crate) fn as_prose(text: &str) -> String {
    let mut paragraphs: Vec<String> = Vec::new();
    let mut paragraph: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            paragraphs.extend(paragraph.take());
        } else if let Some(p) = paragraph.as_mut() {
            p.push(if is_list_item(line) { '\n' } else { ' ' });
            p.push_str(line);
        } else {
            paragraph = Some(line.to_string());
        }
    }
    paragraphs.extend(paragraph);
    paragraphs.join("\n\n")
}

fn is_list_item(line: &str) -> bool {
    line.starts_with("- ") || line.starts_with("* ")
}

/// Calls `f` on `schema` and on every schema nested in it, whichever keyword holds it.
fn for_each_schema(schema: &mut JSONSchemaProps, f: &mut impl FnMut(&mut JSONSchemaProps)) {
    f(schema);
    let maps = [
        &mut schema.properties,
        &mut schema.pattern_properties,
        &mut schema.definitions,
    ];
    for child in maps.into_iter().flatten().flat_map(|m| m.values_mut()) {
        for_each_schema(child, f);
    }
    let lists = [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of];
    for child in lists.into_iter().flatten().flatten() {
        for_each_schema(child, f);
    }
    match schema.items.as_mut() {
        Some(JSONSchemaPropsOrArray::Schema(child)) => for_each_schema(child, f),
        Some(JSONSchemaPropsOrArray::Schemas(children)) => {
            for child in children {
                for_each_schema(child, f);
            }
        }
        None => {}
    }
    for child in [
        &mut schema.additional_items,
        &mut schema.additional_properties,
    ] {
        if let Some(JSONSchemaPropsOrBool::Schema(child)) = child.as_mut() {
            for_each_schema(child, f);
        }
    }
    for dependency in schema.dependencies.iter_mut().flat_map(|d| d.values_mut()) {
        if let JSONSchemaPropsOrStringArray::Schema(child) = dependency {
            for_each_schema(child, f);
        }
    }
    if let Some(child) = schema.not.as_mut() {
        for_each_schema(child, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_a_paragraph_are_joined() {
        assert_eq!(
            as_prose("A suspended tenant cannot log in; set it\nback to false."),
            "A suspended tenant cannot log in; set it back to false."
        );
    }

    #[test]
    fn paragraphs_stay_apart() {
        assert_eq!(as_prose("one\ntwo\n\nthree"), "one two\n\nthree");
        assert_eq!(as_prose("one\n\n\n  \nthree\n"), "one\n\nthree");
    }

    #[test]
    fn list_items_keep_their_lines() {
        let doc = "The policy:\n- `Retain` locks the database\n  and keeps it;\n* `Delete` drops it.\n\nDefault `Retain`.";
        assert_eq!(
            as_prose(doc),
            "The policy:\n- `Retain` locks the database and keeps it;\n* `Delete` drops it.\n\nDefault `Retain`."
        );
    }

    #[test]
    fn prose_is_left_as_it_is() {
        let prose = "changed.  If that is not known\n\n- a\n- b";
        assert_eq!(as_prose(prose), prose);
        assert_eq!(as_prose(&as_prose(prose)), prose);
    }

    #[test]
    fn nested_schemas_and_printer_columns_are_rewritten() {
        let wrapped = || Some("one\ntwo".to_string());
        let leaf = || JSONSchemaProps {
            description: wrapped(),
            ..Default::default()
        };
        let mut crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "things.silo.dev" },
            "spec": {
                "group": "silo.dev",
                "names": { "kind": "Thing", "plural": "things" },
                "scope": "Namespaced",
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "additionalPrinterColumns": [
                        { "name": "A", "type": "string", "jsonPath": ".a", "description": "one\ntwo" }
                    ],
                    "schema": { "openAPIV3Schema": {} }
                }]
            }
        }))
        .expect("a valid CRD");
        let schema = JSONSchemaProps {
            description: wrapped(),
            any_of: Some(vec![leaf()]),
            one_of: Some(vec![leaf()]),
            all_of: Some(vec![leaf()]),
            not: Some(Box::new(leaf())),
            items: Some(JSONSchemaPropsOrArray::Schemas(vec![leaf()])),
            additional_items: Some(JSONSchemaPropsOrBool::Schema(Box::new(leaf()))),
            additional_properties: Some(JSONSchemaPropsOrBool::Schema(Box::new(leaf()))),
            pattern_properties: Some([("^a".to_string(), leaf())].into()),
            definitions: Some([("A".to_string(), leaf())].into()),
            dependencies: Some(
                [(
                    "a".to_string(),
                    JSONSchemaPropsOrStringArray::Schema(Box::new(leaf())),
                )]
                .into(),
            ),
            properties: Some(
                [(
                    "a".to_string(),
                    JSONSchemaProps {
                        items: Some(JSONSchemaPropsOrArray::Schema(Box::new(leaf()))),
                        ..leaf()
                    },
                )]
                .into(),
            ),
            ..Default::default()
        };
        if let Some(validation) = crd.spec.versions[0].schema.as_mut() {
            validation.open_api_v3_schema = Some(schema);
        }

        crd_as_prose(&mut crd);

        let json = serde_json::to_string(&crd).expect("a CRD serializes");
        assert!(
            !json.contains("one\\ntwo"),
            "a description kept its line break: {json}"
        );
        assert_eq!(json.matches("one two").count(), 14);
    }
}
