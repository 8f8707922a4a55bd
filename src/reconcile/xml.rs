//! What `vm define` reads from a libvirt domain XML.

use herd_storage::model::VmSpec;

/// Reads what `vm define` needs from a libvirt domain XML.
pub fn spec_from_xml(xml: &str) -> Result<VmSpec, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid domain XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(format!("invalid domain XML: the root element is <{}>, not <domain>", root.tag_name().name()));
    }
    let child = |tag: &str| root.children().find(|n| n.has_tag_name(tag));
    let text = |tag: &str| child(tag).and_then(|n| n.text()).map(str::trim).filter(|t| !t.is_empty());
    let name = text("name").ok_or("invalid domain XML: no <name>")?.to_string();
    let uuid = text("uuid").ok_or("invalid domain XML: no <uuid> (herd keeps VMs by uuid)")?.to_lowercase();
    let memory = child("memory").ok_or("invalid domain XML: no <memory>")?;
    let amount: u64 = memory
        .text()
        .map(str::trim)
        .unwrap_or("")
        .parse()
        .map_err(|_| "invalid domain XML: <memory> is not a number")?;
    let memory_mib = match memory.attribute("unit").unwrap_or("KiB") {
        "b" | "bytes" => amount / (1024 * 1024),
        "KiB" | "k" => amount / 1024,
        "MiB" | "M" => amount,
        "GiB" | "G" => amount * 1024,
        other => return Err(format!("invalid domain XML: memory unit {other:?}")),
    };
    let vcpus: u32 = text("vcpu").unwrap_or("1").parse().map_err(|_| "invalid domain XML: <vcpu> is not a number")?;
    Ok(VmSpec {
        uuid,
        name,
        xml: xml.to_string(),
        memory_mib,
        vcpus,
        selector: None,
        node_limit: vec![],
        autostart: false,
        migration_method: Default::default(),
    })
}
