"""The sObjects the emulator knows, described the way `sobjects/<name>/describe` reports them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldDef:
    name: str
    type: str  # id string email phone textarea picklist date datetime double currency int boolean reference
    length: int = 0
    required: bool = False  # not nillable on create, no default
    external_id: bool = False
    unique: bool = False
    reference_to: str | None = None
    relationship_name: str | None = None
    picklist: tuple[str, ...] = ()
    restricted: bool = False  # a restricted picklist refuses values outside its list
    createable: bool = True
    precision: int = 0
    scale: int = 0

    def describe(self) -> dict:
        return {
            "name": self.name, "type": self.type, "length": self.length,
            "nillable": not self.required and self.type != "id", "defaultedOnCreate": self.type == "id"
            or not self.createable,
            "createable": self.createable, "updateable": self.createable and self.type != "id",
            "externalId": self.external_id, "idLookup": self.external_id or self.type == "id",
            "unique": self.unique, "referenceTo": [self.reference_to] if self.reference_to else [],
            "relationshipName": self.relationship_name, "precision": self.precision, "scale": self.scale,
            "restrictedPicklist": self.restricted,
            "picklistValues": [{"value": v, "label": v, "active": True, "defaultValue": False}
                               for v in self.picklist],
        }


def _common() -> list[FieldDef]:
    return [
        FieldDef("Id", "id", 18, createable=False),
        FieldDef("IsDeleted", "boolean", createable=False),
        FieldDef("CreatedDate", "datetime", createable=False),
        FieldDef("SystemModstamp", "datetime", createable=False),
        FieldDef("Legacy_Id__c", "string", 64, external_id=True, unique=True),
    ]


OBJECTS: dict[str, tuple[str, list[FieldDef]]] = {  # name -> (Id key prefix, fields)
    "Account": ("001", [
        *_common(),
        FieldDef("Name", "string", 255, required=True),
        FieldDef("Phone", "phone", 40),
        FieldDef("BillingCity", "string", 40),
        FieldDef("BillingCountry", "string", 80),
        FieldDef("Credit_Limit__c", "currency", precision=18, scale=2),
        FieldDef("Customer_Since__c", "date"),
        FieldDef("Legacy_Created__c", "datetime"),
        FieldDef("Employees__c", "int", precision=9),
        FieldDef("Active__c", "boolean"),
        FieldDef("Rating", "picklist", 40, picklist=("Hot", "Warm", "Cold"), restricted=True),
        FieldDef("Description", "textarea", 32000),
    ]),
    "Contact": ("003", [
        *_common(),
        FieldDef("FirstName", "string", 40),
        FieldDef("LastName", "string", 80, required=True),
        FieldDef("Email", "email", 80),
        FieldDef("Phone", "phone", 40),
        FieldDef("MailingCity", "string", 40),
        FieldDef("AccountId", "reference", 18, reference_to="Account", relationship_name="Account"),
        FieldDef("Source_System__c", "picklist", 40, picklist=("legacy_crm", "partner_export", "erp"),
                 restricted=True),
        FieldDef("Birthdate", "date"),
    ]),
}


def fields_of(sobject: str) -> dict[str, FieldDef]:
    return {f.name: f for f in OBJECTS[sobject][1]}
