"""Compare an entity's mapping with the `describe()` metadata of its Salesforce object, before any write:
unknown fields, type and length mismatches, required fields not mapped, picklist values not allowed,
external id fields not marked as such."""

from __future__ import annotations

from crmbridge.mappings.model import Entity, Mapping

# Mapping types each Salesforce field type accepts.
_ACCEPTS = {
    "string": {"string"}, "textarea": {"string"}, "email": {"string"}, "phone": {"string"}, "url": {"string"},
    "picklist": {"string"}, "multipicklist": {"string"}, "id": {"string"}, "reference": {"string"},
    "int": {"integer"}, "double": {"float", "decimal", "integer"}, "currency": {"decimal", "float", "integer"},
    "percent": {"decimal", "float", "integer"}, "boolean": {"boolean"}, "date": {"date"},
    "datetime": {"timestamp"},
}


def check_entity(mapping: Mapping, entity: Entity, fields: dict[str, dict]) -> list[str]:
    problems: list[str] = []
    sobject = entity.target_table
    ext = fields.get(entity.external_id_column)
    if ext is None:
        problems.append(f"external id field `{entity.external_id_column}` does not exist on {sobject}")
    elif not ext.get("externalId") and entity.external_id_column != "Id":
        problems.append(f"`{entity.external_id_column}` is not marked as an External ID on {sobject} (upserts "
                        "need an external id field; tick `External ID` in its definition)")
    if entity.target_key_column not in fields:
        problems.append(f"target key field `{entity.target_key_column}` does not exist on {sobject}")
    for name, spec in entity.fields.items():
        info = fields.get(name)
        if info is None:
            problems.append(f"field `{name}` does not exist on {sobject}")
            continue
        if not info.get("createable") and not info.get("updateable"):
            problems.append(f"field `{name}` cannot be written (it is read-only on {sobject})")
        if spec.ref:
            if info["type"] != "reference":
                problems.append(f"field `{name}` links to `{spec.ref}` but is a {info['type']}, not a lookup")
            else:
                parent = mapping.entity(spec.ref)
                allowed = info.get("referenceTo") or []
                if parent.target_table not in allowed:
                    problems.append(f"field `{name}` looks up {', '.join(allowed) or 'nothing'}, not "
                                    f"`{parent.target_table}` (entity `{spec.ref}`)")
            continue
        accepted = _ACCEPTS.get(info["type"])
        if accepted is not None and spec.type not in accepted:
            problems.append(f"field `{name}` is {info['type']} on {sobject}; the mapping sends {spec.type} "
                            f"(expected type: {' or '.join(sorted(accepted))})")
        length = info.get("length") or 0
        if spec.type == "string" and length and spec.max_length and spec.max_length > length:
            problems.append(f"field `{name}` holds at most {length} characters on {sobject}; the mapping "
                            f"allows {spec.max_length}")
        if info["type"] == "picklist" and info.get("restrictedPicklist") and spec.constant is not None:
            values = [p["value"] for p in info.get("picklistValues", []) if p.get("active", True)]
            if str(spec.constant) not in values:
                problems.append(f"field `{name}` is a restricted picklist; the constant is not one of its "
                                f"{len(values)} active values")
    if entity.mode != "update":
        mapped = {entity.external_id_column, *entity.fields}
        for name, info in fields.items():
            required = (not info.get("nillable", True) and info.get("createable")
                        and not info.get("defaultedOnCreate") and info.get("type") != "boolean")
            if required and name not in mapped:
                problems.append(f"required field `{name}` of {sobject} is not mapped (records cannot be created "
                                "without it)")
    return problems
