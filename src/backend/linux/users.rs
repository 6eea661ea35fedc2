//! Resolving users and groups the way a container's own `/etc/passwd` and
//! `/etc/group` define them.

/// A user as resolved for the container's process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Groups the user belongs to in the image's /etc/group.
    pub image_groups: Vec<u32>,
    pub home: String,
}

#[derive(Debug, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 6).then(|| {
                Some(PasswdEntry {
                    name: fields[0].to_string(),
                    uid: fields[2].parse().ok()?,
                    gid: fields[3].parse().ok()?,
                    home: fields[5].to_string(),
                })
            })?
        })
        .collect()
}

/// (name, gid, members)
pub fn parse_group(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 {
                return None;
            }
            let members = fields[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            Some((fields[0].to_string(), fields[2].parse().ok()?, members))
        })
        .collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} not found in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} not found in the image's /etc/group")]
    UnknownGroup(String),
}

/// Resolves `user` (`name`, `uid`, `name:group`, `uid:gid`, empty = root)
/// against the image's files. A numeric uid need not exist in passwd.
pub fn resolve(user: &str, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
    let users = parse_passwd(passwd);
    let groups = parse_group(group);
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => users.iter().find(|e| e.uid == uid),
        Err(_) => Some(
            users
                .iter()
                .find(|e| e.name == user_part)
                .ok_or_else(|| UserError::UnknownUser(user_part.to_string()))?,
        ),
    };
    let uid = match user_part.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => entry.map(|e| e.uid).unwrap_or_default(),
    };
    let mut gid = entry.map(|e| e.gid).unwrap_or(0);
    if let Some(group_part) = group_part {
        gid = match group_part.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|(name, _, _)| name == group_part)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| UserError::UnknownGroup(group_part.to_string()))?,
        };
    }
    let image_groups = match entry {
        Some(entry) => groups
            .iter()
            .filter(|(_, _, members)| members.contains(&entry.name))
            .map(|(_, gid, _)| *gid)
            .collect(),
        None => Vec::new(),
    };
    Ok(ResolvedUser {
        uid,
        gid,
        image_groups,
        home: entry.map(|e| e.home.clone()).unwrap_or_else(|| "/".to_string()),
    })
}

/// The user's groups from the image when the user is given by uid.
pub fn groups_of_uid(uid: u32, passwd: &str, group: &str) -> Vec<u32> {
    let Some(entry) = parse_passwd(passwd).into_iter().find(|e| e.uid == uid) else {
        return Vec::new();
    };
    parse_group(group)
        .into_iter()
        .filter(|(_, _, members)| members.contains(&entry.name))
        .map(|(_, gid, _)| gid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\ntester:x:1000:1000::/home/tester:/bin/sh\n";
    const GROUP: &str = "root:x:0:\ntester:x:1000:\nextra:x:2000:tester\nother:x:3000:root\n";

    #[test]
    fn resolves_names_numbers_and_groups() {
        let user = resolve("tester", PASSWD, GROUP).unwrap();
        assert_eq!(
            (user.uid, user.gid, user.image_groups.clone()),
            (1000, 1000, vec![2000])
        );
        assert_eq!(user.home, "/home/tester");
        let user = resolve("1000:extra", PASSWD, GROUP).unwrap();
        assert_eq!((user.uid, user.gid), (1000, 2000));
        let user = resolve("4242", PASSWD, GROUP).unwrap();
        assert_eq!((user.uid, user.gid, user.home.as_str()), (4242, 0, "/"));
        let root = resolve("", PASSWD, GROUP).unwrap();
        assert_eq!((root.uid, root.gid, root.image_groups), (0, 0, vec![3000]));
        assert_eq!(
            resolve("nobody", PASSWD, GROUP),
            Err(UserError::UnknownUser("nobody".into()))
        );
        assert_eq!(
            resolve("0:nogroup", PASSWD, GROUP),
            Err(UserError::UnknownGroup("nogroup".into()))
        );
    }
}
