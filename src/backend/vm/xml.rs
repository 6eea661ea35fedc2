//! Domain XML: a small element tree that renders escaped XML, a small reader
//! for what libvirt gives back (metadata, live domain XML), and the domain
//! document for a [`VmSpec`].
//!
//! Console: the serial port is a unix socket QEMU listens on
//! (`<serial type='unix'><source mode='bind'/>`). A per-VM console relay
//! process connects to it, writes the CRI log and serves attach clients
//! (see [`super::console`]); the domain is started paused and resumed once the
//! relay is connected, so no boot output is lost. The relay outlives daemon
//! restarts; if it dies, a new one reconnects to the same socket. An optional
//! `<log file>` keeps a raw copy through virtlogd for the gaps.

use std::borrow::Cow;
use std::fmt::Write as _;

use super::{Accel, METADATA_NS, METADATA_PREFIX, NicAttachment, PodvisorMetadata, VmDisk, VmError, VmSpec, path_str};

/// The guest agent's virtio-serial port name (libvirt recognizes it and connects).
pub const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";
/// Target of the root disk.
pub const ROOT_DISK_TARGET: &str = "vda";
/// Target of the cloud-init seed.
pub const SEED_DISK_TARGET: &str = "vdb";

/// An XML element under construction (or as read back by [`parse`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    pub fn new(name: &str) -> Element {
        Element {
            name: name.to_string(),
            ..Element::default()
        }
    }

    pub fn attr(mut self, name: &str, value: impl Into<String>) -> Element {
        self.attrs.push((name.to_string(), value.into()));
        self
    }

    pub fn text(mut self, text: impl Into<String>) -> Element {
        self.children.push(Node::Text(text.into()));
        self
    }

    pub fn child(mut self, child: Element) -> Element {
        self.children.push(Node::Element(child));
        self
    }

    pub fn push(&mut self, child: Element) {
        self.children.push(Node::Element(child));
    }

    /// `<name>text</name>`
    pub fn leaf(name: &str, text: impl Into<String>) -> Element {
        Element::new(name).text(text)
    }

    /// The value of an attribute.
    pub fn get_attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The name without its namespace prefix.
    pub fn local_name(&self) -> &str {
        self.name.rsplit(':').next().unwrap_or(&self.name)
    }

    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|c| match c {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The first child element with this local name.
    pub fn find(&self, local: &str) -> Option<&Element> {
        self.elements().find(|e| e.local_name() == local)
    }

    /// Follows a path of local names (`"devices/disk"`): the first match at each step.
    pub fn find_path(&self, path: &str) -> Option<&Element> {
        path.split('/').try_fold(self, |e, step| e.find(step))
    }

    /// Every descendant element (depth first) with this local name.
    pub fn descendants<'a>(&'a self, local: &'a str) -> Vec<&'a Element> {
        let mut found = Vec::new();
        for child in self.elements() {
            if child.local_name() == local {
                found.push(child);
            }
            found.extend(child.descendants(local));
        }
        found
    }

    /// All text directly inside this element, concatenated.
    pub fn text_content(&self) -> String {
        self.children
            .iter()
            .filter_map(|c| match c {
                Node::Text(t) => Some(t.as_str()),
                Node::Element(_) => None,
            })
            .collect()
    }

    /// Renders the element as an indented document fragment.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out, 0);
        out
    }

    fn render_into(&self, out: &mut String, depth: usize) {
        let indent = "  ".repeat(depth);
        out.push_str(&indent);
        out.push('<');
        out.push_str(&self.name);
        for (name, value) in &self.attrs {
            let _ = write!(out, " {name}=\"{}\"", escape_attr(value));
        }
        if self.children.is_empty() {
            out.push_str("/>\n");
            return;
        }
        out.push('>');
        let only_text = self.children.iter().all(|c| matches!(c, Node::Text(_)));
        if only_text {
            out.push_str(&escape_text(&self.text_content()));
        } else {
            out.push('\n');
            for child in &self.children {
                match child {
                    Node::Element(e) => e.render_into(out, depth + 1),
                    Node::Text(t) => {
                        let _ = writeln!(out, "{indent}  {}", escape_text(t));
                    }
                }
            }
            out.push_str(&indent);
        }
        let _ = writeln!(out, "</{}>", self.name);
    }
}

/// Whether XML 1.0 allows this character at all (even escaped).
fn xml_char_ok(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn escape(s: &str, attr: bool) -> Cow<'_, str> {
    let special = |c: char| matches!(c, '&' | '<' | '>') || (attr && matches!(c, '"' | '\'' | '\n' | '\r' | '\t'));
    if !s.chars().any(|c| special(c) || !xml_char_ok(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attr => out.push_str("&quot;"),
            '\'' if attr => out.push_str("&apos;"),
            // Attribute value normalization would turn these into spaces.
            '\n' if attr => out.push_str("&#10;"),
            '\r' if attr => out.push_str("&#13;"),
            '\t' if attr => out.push_str("&#9;"),
            // Not representable in XML 1.0; specs are validated, this is the last line of defense.
            c if !xml_char_ok(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Escapes text content.
pub fn escape_text(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// Escapes an attribute value (for double or single quotes).
pub fn escape_attr(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

/// Parses a document (or fragment with one root element): elements,
/// attributes, text and character references. Comments, processing
/// instructions and the XML declaration are skipped; DTDs are refused.
pub fn parse(xml: &str) -> Result<Element, String> {
    let mut reader = Reader { s: xml, pos: 0 };
    reader.skip_misc()?;
    let root = reader.element()?;
    reader.skip_misc()?;
    if reader.pos != xml.len() {
        return Err(format!("trailing content at byte {}", reader.pos));
    }
    Ok(root)
}

struct Reader<'a> {
    s: &'a str,
    pos: usize,
}

impl Reader<'_> {
    fn rest(&self) -> &str {
        &self.s[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.s.len() - trimmed.len();
    }

    fn skip_past(&mut self, end: &str) -> Result<(), String> {
        let at = self
            .rest()
            .find(end)
            .ok_or_else(|| format!("unterminated construct, expected {end:?}"))?;
        self.pos += at + end.len();
        Ok(())
    }

    /// Whitespace, comments and processing instructions.
    fn skip_misc(&mut self) -> Result<(), String> {
        loop {
            self.skip_ws();
            if self.rest().starts_with("<?") {
                self.skip_past("?>")?;
            } else if self.rest().starts_with("<!--") {
                self.skip_past("-->")?;
            } else if self.rest().starts_with("<!") {
                return Err("DTDs are not supported".into());
            } else {
                return Ok(());
            }
        }
    }

    fn name(&mut self) -> Result<String, String> {
        let len = self
            .rest()
            .find(|c: char| c.is_whitespace() || matches!(c, '>' | '/' | '='))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(format!("expected a name at byte {}", self.pos));
        }
        let name = self.rest()[..len].to_string();
        self.pos += len;
        Ok(name)
    }

    fn element(&mut self) -> Result<Element, String> {
        if !self.rest().starts_with('<') {
            return Err(format!("expected '<' at byte {}", self.pos));
        }
        self.pos += 1;
        let mut element = Element::new(&self.name()?);
        loop {
            self.skip_ws();
            if self.rest().starts_with("/>") {
                self.pos += 2;
                return Ok(element);
            }
            if self.rest().starts_with('>') {
                self.pos += 1;
                break;
            }
            let name = self.name()?;
            self.skip_ws();
            if !self.rest().starts_with('=') {
                return Err(format!("expected '=' after attribute {name}"));
            }
            self.pos += 1;
            self.skip_ws();
            let quote = self.rest().chars().next().filter(|c| *c == '"' || *c == '\'');
            let quote = quote.ok_or_else(|| format!("unquoted value of attribute {name}"))?;
            self.pos += 1;
            let end = self.rest().find(quote).ok_or("unterminated attribute value")?;
            let value = unescape(&self.rest()[..end])?;
            self.pos += end + 1;
            element.attrs.push((name, value));
        }
        loop {
            let rest = self.rest();
            if rest.starts_with("</") {
                self.pos += 2;
                let name = self.name()?;
                if name != element.name {
                    return Err(format!("</{name}> closes <{}>", element.name));
                }
                self.skip_ws();
                if !self.rest().starts_with('>') {
                    return Err(format!("malformed end tag </{name}"));
                }
                self.pos += 1;
                return Ok(element);
            } else if rest.starts_with("<!--") || rest.starts_with("<?") {
                self.skip_misc()?;
            } else if rest.starts_with("<![CDATA[") {
                self.pos += 9;
                let end = self.rest().find("]]>").ok_or("unterminated CDATA")?;
                element.children.push(Node::Text(self.rest()[..end].to_string()));
                self.pos += end + 3;
            } else if rest.starts_with('<') {
                let child = self.element()?;
                element.children.push(Node::Element(child));
            } else if rest.is_empty() {
                return Err(format!("<{}> is not closed", element.name));
            } else {
                let end = rest.find('<').unwrap_or(rest.len());
                let text = unescape(&rest[..end])?;
                self.pos += end;
                if !text.trim().is_empty() {
                    element.children.push(Node::Text(text));
                }
            }
        }
    }
}

fn unescape(s: &str) -> Result<String, String> {
    if !s.contains('&') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let semi = rest[amp..].find(';').ok_or("unterminated entity")? + amp;
        let entity = &rest[amp + 1..semi];
        let c = match entity {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = entity.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = entity.strip_prefix('#') {
                    dec.parse().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32)
                    .ok_or_else(|| format!("unknown entity &{entity};"))?
            }
        };
        out.push(c);
        rest = &rest[semi + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The `<podvisor:pod>` element stored in `<metadata>`.
pub fn metadata_element(metadata: &PodvisorMetadata) -> Element {
    let prefixed = |name: &str| format!("{METADATA_PREFIX}:{name}");
    Element::new(&prefixed("pod"))
        .attr(&format!("xmlns:{METADATA_PREFIX}"), METADATA_NS)
        .child(Element::leaf(&prefixed("sandbox"), metadata.sandbox_id.as_str()))
        .child(Element::leaf(&prefixed("container"), metadata.container_id.as_str()))
}

/// Reads podvisor's metadata element back (as `virDomainGetMetadata` returns
/// it, whatever prefix libvirt chose).
pub fn parse_metadata(xml: &str) -> Option<PodvisorMetadata> {
    let pod = parse(xml).ok()?;
    if pod.local_name() != "pod" {
        return None;
    }
    Some(PodvisorMetadata {
        sandbox_id: pod.find("sandbox")?.text_content(),
        container_id: pod.find("container").map(Element::text_content).unwrap_or_default(),
    })
}

/// The `dev` of every `<disk>` target in a domain document.
pub fn disk_targets(domain_xml: &str) -> Vec<String> {
    let Ok(domain) = parse(domain_xml) else {
        return Vec::new();
    };
    let Some(devices) = domain.find("devices") else {
        return Vec::new();
    };
    devices
        .elements()
        .filter(|e| e.name == "disk")
        .filter_map(|disk| disk.find("target")?.get_attr("dev").map(str::to_string))
        .collect()
}

fn check_text(what: &str, value: &str) -> Result<(), VmError> {
    match value.chars().find(|c| !xml_char_ok(*c) || *c == '\0') {
        Some(c) => Err(VmError::Invalid(format!("{what} contains the character {c:?}"))),
        None => Ok(()),
    }
}

fn check_path(what: &str, path: &std::path::Path) -> Result<String, VmError> {
    let text = path_str(path)?;
    if !path.is_absolute() {
        return Err(VmError::Invalid(format!("{what} {text} is not an absolute path")));
    }
    check_text(what, text)?;
    Ok(text.to_string())
}

fn check_ifname(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_graphic() && c != '/' && c != ':');
    if ok {
        Ok(())
    } else {
        Err(VmError::Invalid(format!("invalid interface name {name:?}")))
    }
}

/// Checks `52:54:00:12:34:56` form and that it is a unicast address.
pub fn check_mac(mac: &str) -> Result<(), VmError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let hex = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
    let unicast = hex && u8::from_str_radix(octets[0], 16).is_ok_and(|first| first & 1 == 0);
    if unicast {
        Ok(())
    } else {
        Err(VmError::Invalid(format!("invalid unicast MAC address {mac:?}")))
    }
}

fn check_uuid(uuid: &str) -> Result<(), VmError> {
    let groups: Vec<usize> = uuid.split('-').map(str::len).collect();
    if groups == [8, 4, 4, 4, 12] && uuid.chars().all(|c| c == '-' || c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(VmError::Invalid(format!("invalid UUID {uuid:?}")))
    }
}

fn check_name(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(VmError::Invalid(format!("invalid domain name {name:?}")))
    }
}

/// libvirt's `<cputune>` for CRI limits. CRI's quota is for the whole VM, so
/// it becomes `global_quota`/`global_period` (plain `quota` is per vCPU).
fn cputune(cpu: &super::CpuTune) -> Result<Option<Element>, VmError> {
    let mut tune = Element::new("cputune");
    if let Some(shares) = cpu.shares {
        if !(2..=262_144).contains(&shares) {
            return Err(VmError::Invalid(format!("cpu shares {shares} out of range 2..=262144")));
        }
        tune.push(Element::leaf("shares", shares.to_string()));
    }
    let quota = cpu.quota.filter(|q| *q > 0);
    if let Some(quota) = quota {
        let period = cpu.period.filter(|p| *p > 0).unwrap_or(100_000);
        if !(1_000..=1_000_000).contains(&period) {
            return Err(VmError::Invalid(format!(
                "cpu period {period} out of range 1000..=1000000"
            )));
        }
        // libvirt's minimum; a smaller CRI quota still means "almost nothing".
        let quota = quota.max(1_000);
        tune.push(Element::leaf("global_period", period.to_string()));
        tune.push(Element::leaf("global_quota", quota.to_string()));
    }
    Ok((!tune.children.is_empty()).then_some(tune))
}

fn qcow2_disk(path: &str, target: &str) -> Element {
    Element::new("disk")
        .attr("type", "file")
        .attr("device", "disk")
        .child(
            Element::new("driver")
                .attr("name", "qemu")
                .attr("type", "qcow2")
                .attr("discard", "unmap"),
        )
        .child(Element::new("source").attr("file", path))
        .child(Element::new("target").attr("dev", target).attr("bus", "virtio"))
}

fn unix_source(path: &str) -> Element {
    Element::new("source").attr("mode", "bind").attr("path", path)
}

/// The CPU element for KVM guests (the probe runs the same one).
pub fn kvm_cpu() -> Element {
    Element::new("cpu")
        .attr("mode", "host-passthrough")
        .attr("check", "none")
}

/// The domain XML for `spec`, on `accel`.
pub fn domain_xml(spec: &VmSpec, accel: Accel) -> Result<String, VmError> {
    check_name(&spec.name)?;
    check_uuid(&spec.uuid)?;
    if spec.vcpus == 0 || spec.vcpus > 255 {
        return Err(VmError::Invalid(format!("vcpus {} out of range 1..=255", spec.vcpus)));
    }
    if spec.memory_mib < 16 {
        return Err(VmError::Invalid(format!(
            "memory {} MiB is below 16 MiB",
            spec.memory_mib
        )));
    }
    check_text("sandbox id", &spec.metadata.sandbox_id)?;
    check_text("container id", &spec.metadata.container_id)?;

    let mut os = Element::new("os").child(
        Element::new("type")
            .attr("arch", "x86_64")
            .attr("machine", "q35")
            .text("hvm"),
    );
    match &spec.disk {
        VmDisk::Qcow2Overlay(_) => os.push(Element::new("boot").attr("dev", "hd")),
        VmDisk::DirectKernel {
            kernel,
            initrd,
            cmdline,
            root: _,
        } => {
            os.push(Element::leaf("kernel", check_path("kernel", kernel)?));
            if let Some(initrd) = initrd {
                os.push(Element::leaf("initrd", check_path("initrd", initrd)?));
            }
            check_text("kernel command line", cmdline)?;
            os.push(Element::leaf("cmdline", cmdline.as_str()));
        }
    }

    let mut domain = Element::new("domain")
        .attr("type", accel.domain_type())
        .child(Element::leaf("name", spec.name.as_str()))
        .child(Element::leaf("uuid", spec.uuid.as_str()))
        .child(Element::new("metadata").child(metadata_element(&spec.metadata)))
        .child(Element::leaf("memory", spec.memory_mib.to_string()).attr("unit", "MiB"))
        .child(Element::leaf("currentMemory", spec.memory_mib.to_string()).attr("unit", "MiB"))
        .child(Element::leaf("vcpu", spec.vcpus.to_string()).attr("placement", "static"));
    if let Some(tune) = cputune(&spec.cpu)? {
        domain.push(tune);
    }
    domain.push(os);
    domain.push(
        Element::new("features")
            .child(Element::new("acpi"))
            .child(Element::new("apic")),
    );
    if accel == Accel::Kvm {
        domain.push(kvm_cpu());
    }
    domain.push(Element::new("clock").attr("offset", "utc"));
    domain.push(Element::leaf("on_poweroff", "destroy"));
    domain.push(Element::leaf("on_reboot", "restart"));
    domain.push(Element::leaf("on_crash", "destroy"));

    let mut devices = Element::new("devices");
    if let Some(root) = spec.disk.root_disk() {
        devices.push(qcow2_disk(&check_path("root disk", root)?, ROOT_DISK_TARGET));
    }
    if let Some(seed) = &spec.seed_iso {
        devices.push(
            Element::new("disk")
                .attr("type", "file")
                .attr("device", "disk")
                .child(Element::new("driver").attr("name", "qemu").attr("type", "raw"))
                .child(Element::new("source").attr("file", check_path("seed ISO", seed)?))
                .child(
                    Element::new("target")
                        .attr("dev", SEED_DISK_TARGET)
                        .attr("bus", "virtio"),
                )
                .child(Element::new("readonly")),
        );
    }
    devices.push(Element::new("controller").attr("type", "usb").attr("model", "none"));
    if let Some(nic) = &spec.nic {
        check_mac(&nic.mac)?;
        let interface = match &nic.attachment {
            NicAttachment::Tap(tap) => {
                check_ifname(tap)?;
                Element::new("interface")
                    .attr("type", "ethernet")
                    .child(Element::new("target").attr("dev", tap.as_str()).attr("managed", "no"))
            }
            NicAttachment::Bridge(bridge) => {
                check_ifname(bridge)?;
                Element::new("interface")
                    .attr("type", "bridge")
                    .child(Element::new("source").attr("bridge", bridge.as_str()))
            }
        };
        devices.push(
            interface
                .child(Element::new("mac").attr("address", nic.mac.to_ascii_lowercase()))
                .child(Element::new("model").attr("type", "virtio")),
        );
    }
    let mut serial = Element::new("serial")
        .attr("type", "unix")
        .child(unix_source(&check_path("console socket", &spec.console_socket)?))
        .child(
            Element::new("target")
                .attr("type", "isa-serial")
                .attr("port", "0")
                .child(Element::new("model").attr("name", "isa-serial")),
        );
    if let Some(raw) = &spec.console_raw_log {
        serial.push(
            Element::new("log")
                .attr("file", check_path("console log", raw)?)
                .attr("append", "on"),
        );
    }
    devices.push(serial);
    devices.push(
        Element::new("channel")
            .attr("type", "unix")
            .child(unix_source(&check_path("agent socket", &spec.agent_socket)?))
            .child(
                Element::new("target")
                    .attr("type", "virtio")
                    .attr("name", AGENT_CHANNEL),
            ),
    );
    devices.push(
        Element::new("memballoon")
            .attr("model", "virtio")
            .child(Element::new("stats").attr("period", "5")),
    );
    devices.push(
        Element::new("rng")
            .attr("model", "virtio")
            .child(Element::leaf("backend", "/dev/urandom").attr("model", "random")),
    );
    // Guest panics (with the guest's pvpanic driver) end the domain as "crashed".
    devices.push(Element::new("panic").attr("model", "isa"));
    domain.push(devices);
    // QEMU runs as root with podvisor's own file modes: libvirt must not chown
    // the image store's shared, read-only base disks (it relabels whole backing chains).
    domain.push(
        Element::new("seclabel")
            .attr("type", "static")
            .attr("model", "dac")
            .attr("relabel", "no")
            .child(Element::leaf("label", "+0:+0")),
    );
    Ok(domain.render())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::backend::vm::{CpuTune, VmNic};

    /// Edits a valid input into an invalid one.
    type Change = Box<dyn Fn(&mut VmSpec)>;

    fn spec() -> VmSpec {
        VmSpec {
            name: "podvisor-0123456789ab".into(),
            uuid: "6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d".into(),
            vcpus: 2,
            memory_mib: 512,
            cpu: CpuTune::default(),
            disk: VmDisk::Qcow2Overlay("/var/lib/podvisor/vm/x/root.qcow2".into()),
            seed_iso: Some("/var/lib/podvisor/vm/x/seed.iso".into()),
            nic: Some(VmNic {
                attachment: NicAttachment::Tap("pvtap0".into()),
                mac: "52:54:00:AB:cd:01".into(),
            }),
            console_socket: "/run/podvisor/vm/x/console.sock".into(),
            console_raw_log: None,
            agent_socket: "/run/podvisor/vm/x/agent.sock".into(),
            metadata: PodvisorMetadata {
                sandbox_id: "0123456789abcdef".into(),
                container_id: "fedcba".into(),
            },
        }
    }

    fn parsed(spec: &VmSpec, accel: Accel) -> Element {
        let xml = domain_xml(spec, accel).unwrap();
        parse(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"))
    }

    #[test]
    fn escapes_text_and_attributes() {
        assert_eq!(escape_text("a<b>&c\"'"), "a&lt;b&gt;&amp;c\"'");
        assert_eq!(escape_attr("a<b>&c\"'\n"), "a&lt;b&gt;&amp;c&quot;&apos;&#10;");
        assert!(matches!(escape_text("plain"), Cow::Borrowed(_)));
        assert_eq!(escape_text("x\u{1}y"), "x\u{FFFD}y");
        let element = Element::new("a").attr("v", "\"<&>'\t").text("1 < 2 && 3 > 2");
        let back = parse(&element.render()).unwrap();
        assert_eq!(back.get_attr("v"), Some("\"<&>'\t"));
        assert_eq!(back.text_content(), "1 < 2 && 3 > 2");
    }

    #[test]
    fn parses_what_libvirt_returns() {
        let xml = "<?xml version='1.0'?>\n<!-- c --><domain type='kvm' id=\"3\"><name>x&#x41;&#66;</name>\
                   <devices><disk type='file'><target dev='vda' bus='virtio'/></disk>\
                   <disk type='file'><target dev='vdb'/></disk><![CDATA[<raw>]]></devices></domain>";
        let domain = parse(xml).unwrap();
        assert_eq!(domain.get_attr("id"), Some("3"));
        assert_eq!(domain.find("name").unwrap().text_content(), "xAB");
        assert_eq!(disk_targets(xml), ["vda", "vdb"]);
        assert!(parse("<a><b></a>").is_err());
        assert!(parse("<a>").is_err());
        assert!(parse("<a/><b/>").is_err());
        assert!(parse("<!DOCTYPE a><a/>").is_err());
    }

    #[test]
    fn metadata_round_trips_with_any_prefix() {
        let meta = spec().metadata;
        assert_eq!(parse_metadata(&metadata_element(&meta).render()), Some(meta.clone()));
        let libvirt_style = format!(
            "<pv:pod xmlns:pv=\"{METADATA_NS}\">\n  <pv:sandbox>0123456789abcdef</pv:sandbox>\n  \
             <pv:container>fedcba</pv:container>\n</pv:pod>"
        );
        assert_eq!(parse_metadata(&libvirt_style), Some(meta));
        assert_eq!(parse_metadata("<other/>"), None);
    }

    #[test]
    fn overlay_domain_has_all_devices() {
        let domain = parsed(&spec(), Accel::Tcg);
        assert_eq!(domain.get_attr("type"), Some("qemu"));
        assert_eq!(domain.find("name").unwrap().text_content(), "podvisor-0123456789ab");
        assert_eq!(domain.find("memory").unwrap().get_attr("unit"), Some("MiB"));
        assert_eq!(domain.find("vcpu").unwrap().text_content(), "2");
        assert!(domain.find("cpu").is_none(), "TCG uses QEMU's default CPU model");
        assert!(domain.find("cputune").is_none());
        assert_eq!(domain.find_path("os/boot").unwrap().get_attr("dev"), Some("hd"));
        assert!(domain.find_path("features/acpi").is_some());

        let pod = domain.find_path("metadata/pod").unwrap();
        assert_eq!(pod.name, "podvisor:pod");
        assert_eq!(pod.get_attr("xmlns:podvisor"), Some(METADATA_NS));
        assert_eq!(pod.find("sandbox").unwrap().text_content(), "0123456789abcdef");

        let devices = domain.find("devices").unwrap();
        let disks: Vec<_> = devices.elements().filter(|e| e.name == "disk").collect();
        assert_eq!(disks.len(), 2);
        assert_eq!(
            disks[0].find("source").unwrap().get_attr("file"),
            Some("/var/lib/podvisor/vm/x/root.qcow2")
        );
        assert_eq!(disks[0].find("driver").unwrap().get_attr("type"), Some("qcow2"));
        assert!(disks[1].find("readonly").is_some());
        assert_eq!(disks[1].find("target").unwrap().get_attr("dev"), Some(SEED_DISK_TARGET));

        let nic = devices.find("interface").unwrap();
        assert_eq!(nic.get_attr("type"), Some("ethernet"));
        assert_eq!(nic.find("target").unwrap().get_attr("dev"), Some("pvtap0"));
        assert_eq!(nic.find("target").unwrap().get_attr("managed"), Some("no"));
        assert_eq!(nic.find("mac").unwrap().get_attr("address"), Some("52:54:00:ab:cd:01"));

        let serial = devices.find("serial").unwrap();
        assert_eq!(serial.get_attr("type"), Some("unix"));
        assert_eq!(serial.find("source").unwrap().get_attr("mode"), Some("bind"));
        assert_eq!(
            serial.find("source").unwrap().get_attr("path"),
            Some("/run/podvisor/vm/x/console.sock")
        );
        let channel = devices.find("channel").unwrap();
        assert_eq!(channel.find("target").unwrap().get_attr("name"), Some(AGENT_CHANNEL));
        assert_eq!(
            channel.find("source").unwrap().get_attr("path"),
            Some("/run/podvisor/vm/x/agent.sock")
        );
        assert_eq!(devices.find("panic").unwrap().get_attr("model"), Some("isa"));
        assert_eq!(domain.find("on_crash").unwrap().text_content(), "destroy");
    }

    #[test]
    fn direct_kernel_kvm_bridge_and_cputune() {
        let mut spec = spec();
        spec.disk = VmDisk::DirectKernel {
            kernel: "/boot/vmlinuz".into(),
            initrd: Some("/boot/initrd.img".into()),
            cmdline: "console=ttyS0 root=/dev/vda1 x=\"<&>\"".into(),
            root: None,
        };
        spec.seed_iso = None;
        spec.nic.as_mut().unwrap().attachment = NicAttachment::Bridge("br0".into());
        spec.cpu = CpuTune {
            shares: Some(1024),
            quota: Some(150_000),
            period: None,
        };
        spec.console_raw_log = Some("/var/log/podvisor/x.console".into());
        let xml = domain_xml(&spec, Accel::Kvm).unwrap();
        assert!(
            xml.contains("<cmdline>console=ttyS0 root=/dev/vda1 x=\"&lt;&amp;&gt;\"</cmdline>"),
            "{xml}"
        );
        let domain = parse(&xml).unwrap();
        assert_eq!(domain.get_attr("type"), Some("kvm"));
        assert_eq!(domain.find("cpu").unwrap().get_attr("mode"), Some("host-passthrough"));
        assert_eq!(
            domain.find_path("os/cmdline").unwrap().text_content(),
            "console=ttyS0 root=/dev/vda1 x=\"<&>\""
        );
        assert_eq!(
            domain.find_path("os/initrd").unwrap().text_content(),
            "/boot/initrd.img"
        );
        assert!(domain.find_path("os/boot").is_none());
        assert!(domain.descendants("disk").is_empty());
        let tune = domain.find("cputune").unwrap();
        assert_eq!(tune.find("shares").unwrap().text_content(), "1024");
        assert_eq!(tune.find("global_period").unwrap().text_content(), "100000");
        assert_eq!(tune.find("global_quota").unwrap().text_content(), "150000");
        let nic = domain.find_path("devices/interface").unwrap();
        assert_eq!(nic.find("source").unwrap().get_attr("bridge"), Some("br0"));
        let log = domain.find_path("devices/serial/log").unwrap();
        assert_eq!(log.get_attr("file"), Some("/var/log/podvisor/x.console"));
    }

    #[test]
    fn rejects_bad_specs() {
        let bad: Vec<Change> = vec![
            Box::new(|s| s.name = "a b".into()),
            Box::new(|s| s.name = "<x>".into()),
            Box::new(|s| s.uuid = "nope".into()),
            Box::new(|s| s.vcpus = 0),
            Box::new(|s| s.memory_mib = 1),
            Box::new(|s| s.nic.as_mut().unwrap().mac = "53:54:00:00:00:01".into()),
            Box::new(|s| s.nic.as_mut().unwrap().mac = "52:54:00:00:00".into()),
            Box::new(|s| s.nic.as_mut().unwrap().attachment = NicAttachment::Tap("a/b".into())),
            Box::new(|s| s.nic.as_mut().unwrap().attachment = NicAttachment::Tap("sixteen-chars-xx".into())),
            Box::new(|s| s.disk = VmDisk::Qcow2Overlay("relative.qcow2".into())),
            Box::new(|s| s.console_socket = PathBuf::from("/run/a\u{1}b")),
            Box::new(|s| s.metadata.sandbox_id = "a\0".into()),
            Box::new(|s| s.cpu.shares = Some(1)),
            Box::new(|s| {
                s.cpu.quota = Some(50_000);
                s.cpu.period = Some(10);
            }),
            Box::new(|s| {
                s.disk = VmDisk::DirectKernel {
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: "a\u{7}".into(),
                    root: None,
                }
            }),
        ];
        for (i, change) in bad.iter().enumerate() {
            let mut spec = spec();
            change(&mut spec);
            assert!(
                matches!(domain_xml(&spec, Accel::Tcg), Err(VmError::Invalid(_))),
                "case {i} accepted"
            );
        }
    }

    #[test]
    fn small_quota_is_raised_to_libvirts_minimum() {
        let mut spec = spec();
        spec.cpu.quota = Some(500);
        spec.cpu.period = Some(10_000);
        let domain = parsed(&spec, Accel::Tcg);
        assert_eq!(domain.find_path("cputune/global_quota").unwrap().text_content(), "1000");
        assert_eq!(
            domain.find_path("cputune/global_period").unwrap().text_content(),
            "10000"
        );
    }

    /// Checks the generated documents against libvirt's own RelaxNG schema,
    /// when `virt-xml-validate` (libvirt-clients) is installed.
    #[test]
    fn validates_against_libvirt_schema() {
        if std::process::Command::new("virt-xml-validate")
            .arg("--help")
            .output()
            .is_err()
        {
            eprintln!("virt-xml-validate not installed; skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("vmdomain-xml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut kernel = spec();
        kernel.disk = VmDisk::DirectKernel {
            kernel: "/boot/vmlinuz".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            root: Some("/r.qcow2".into()),
        };
        kernel.cpu = CpuTune {
            shares: Some(512),
            quota: Some(20_000),
            period: Some(100_000),
        };
        kernel.console_raw_log = Some("/var/log/x".into());
        kernel.nic.as_mut().unwrap().attachment = NicAttachment::Bridge("br0".into());
        for (i, (spec, accel)) in [(spec(), Accel::Tcg), (kernel, Accel::Kvm)].into_iter().enumerate() {
            let path = dir.join(format!("d{i}.xml"));
            std::fs::write(&path, domain_xml(&spec, accel).unwrap()).unwrap();
            let out = std::process::Command::new("virt-xml-validate")
                .arg(&path)
                .arg("domain")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
