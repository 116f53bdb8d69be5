//! Delta deletion vectors, the protocol's "Deletion Vector Format": which rows of a data file
//! are deleted, read for any table and written for the live table in
//! `--live-mode deletion-vectors`.
//!
//! A deletion vector is a 64-bit Roaring bitmap of row positions in its data file (the
//! portable serialization, preceded by the magic number 1681511377, little-endian). It is
//! stored inline in the log (storage type `i`, Z85-encoded) or in a file of the table
//! (storage type `u`: `<prefix>deletion_vector_<uuid>.bin`, the UUID Z85-encoded in the
//! descriptor). Such a file starts with a version byte (1) and holds one deletion vector after
//! another, each as: its size (4 bytes, big-endian), the magic and bitmap, a CRC-32 of the
//! magic and bitmap (4 bytes, big-endian). A descriptor's offset points at the size.

use deltalake::kernel::{DeletionVectorDescriptor, StorageType};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use roaring::RoaringTreemap;

use crate::error::{Error, Result};

const MAGIC: u32 = 1_681_511_377;
const FORMAT_VERSION: u8 = 1;
/// Characters of a Z85-encoded UUID at the end of a `u` descriptor's path.
const UUID_CHARS: usize = 20;

/// The rows of one data file that `dv` deletes. `store` is the table's store (paths relative
/// to the table root).
pub async fn deleted_rows(
    store: &dyn ObjectStore,
    dv: &DeletionVectorDescriptor,
) -> Result<RoaringTreemap> {
    match dv.storage_type {
        StorageType::Inline => {
            let bytes = z85::decode(&dv.path_or_inline_dv)
                .map_err(|e| bad(dv, &format!("inline data is not Z85 ({e})")))?;
            decode_bitmap(&bytes, dv)
        }
        StorageType::UuidRelativePath => {
            let path = file_path(&dv.path_or_inline_dv).ok_or_else(|| bad(dv, "bad path"))?;
            let start = dv.offset.unwrap_or(1).max(0) as u64;
            let size = dv.size_in_bytes.max(0) as u64;
            let bytes = store.get_range(&path, start..start + 4 + size + 4).await?;
            let stated = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes")) as u64;
            if stated != size {
                return Err(bad(dv, &format!("its file says {stated} bytes")));
            }
            let data = &bytes[4..4 + size as usize];
            let crc = u32::from_be_bytes(bytes[4 + size as usize..].try_into().expect("4 bytes"));
            if crc32fast::hash(data) != crc {
                return Err(bad(dv, "checksum mismatch"));
            }
            decode_bitmap(data, dv)
        }
        StorageType::AbsolutePath => Err(Error::usage(format!(
            "a data file's deletion vector is stored at an absolute path ({}); sessionizer \
             reads only deletion vectors stored in the table or inline. Purge them first \
             (Spark: REORG TABLE ... APPLY (PURGE))",
            dv.path_or_inline_dv
        ))),
    }
}

/// The file of a `u` descriptor: the optional prefix, then `deletion_vector_<uuid>.bin`.
fn file_path(encoded: &str) -> Option<Path> {
    let split = encoded.len().checked_sub(UUID_CHARS)?;
    let (prefix, z) = encoded.split_at_checked(split)?;
    let uuid = uuid::Uuid::from_slice(&z85::decode(z).ok()?).ok()?;
    let name = format!("deletion_vector_{uuid}.bin");
    Some(if prefix.is_empty() {
        Path::from(name)
    } else {
        Path::from(format!("{prefix}/{name}"))
    })
}

fn decode_bitmap(bytes: &[u8], dv: &DeletionVectorDescriptor) -> Result<RoaringTreemap> {
    if bytes.len() < 4 || u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) != MAGIC {
        return Err(bad(dv, "not a portable Roaring bitmap (bad magic number)"));
    }
    let rows = RoaringTreemap::deserialize_from(&bytes[4..])
        .map_err(|e| bad(dv, &format!("bitmap does not decode ({e})")))?;
    if rows.len() != dv.cardinality.max(0) as u64 {
        return Err(bad(
            dv,
            &format!("it holds {} rows, not {}", rows.len(), dv.cardinality),
        ));
    }
    Ok(rows)
}

fn bad(dv: &DeletionVectorDescriptor, why: &str) -> Error {
    Error::Checkpoint(format!(
        "a deletion vector ({:?} `{}`) cannot be read: {why}",
        dv.storage_type, dv.path_or_inline_dv
    ))
}

/// One deletion-vector file being built: every deletion vector a commit writes goes into one
/// file, put before the commit that references it (a run that dies first leaves an
/// unreferenced file, which VACUUM removes).
pub struct DvFile {
    uuid: uuid::Uuid,
    bytes: Vec<u8>,
}

impl Default for DvFile {
    fn default() -> Self {
        Self {
            uuid: uuid::Uuid::new_v4(),
            bytes: vec![FORMAT_VERSION],
        }
    }
}

impl DvFile {
    /// Appends `rows` and returns the descriptor that points at them.
    pub fn push(&mut self, rows: &RoaringTreemap) -> Result<DeletionVectorDescriptor> {
        let offset = i32::try_from(self.bytes.len())
            .map_err(|_| Error::Checkpoint("a deletion-vector file passed 2 GiB".into()))?;
        let mut data = MAGIC.to_le_bytes().to_vec();
        rows.serialize_into(&mut data)?;
        let size = data.len() as u32;
        self.bytes.extend_from_slice(&size.to_be_bytes());
        self.bytes.extend_from_slice(&data);
        self.bytes
            .extend_from_slice(&crc32fast::hash(&data).to_be_bytes());
        Ok(DeletionVectorDescriptor {
            storage_type: StorageType::UuidRelativePath,
            path_or_inline_dv: z85::encode(self.uuid.as_bytes()),
            offset: Some(offset),
            size_in_bytes: size as i32,
            cardinality: rows.len() as i64,
        })
    }

    /// Bytes of the file so far.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.len() <= 1
    }

    /// Writes the file into the table (nothing when it holds no deletion vector). Returns the
    /// bytes written.
    pub async fn put(self, store: &dyn ObjectStore) -> Result<usize> {
        if self.is_empty() {
            return Ok(0);
        }
        let n = self.bytes.len();
        let path = Path::from(format!("deletion_vector_{}.bin", self.uuid));
        store.put(&path, self.bytes.into()).await?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn rows(v: &[u64]) -> RoaringTreemap {
        v.iter().copied().collect()
    }

    #[tokio::test]
    async fn written_vectors_read_back_from_their_descriptors() {
        let store = InMemory::new();
        let mut file = DvFile::default();
        let a = rows(&[0, 5, 65_536, 1 << 33]);
        let b = rows(&(0..10_000).map(|i| i * 3).collect::<Vec<_>>());
        let da = file.push(&a).unwrap();
        let db = file.push(&b).unwrap();
        assert_eq!(da.offset, Some(1));
        assert_eq!(da.path_or_inline_dv.len(), UUID_CHARS);
        assert_eq!(db.cardinality, 10_000);
        file.put(&store).await.unwrap();
        assert_eq!(deleted_rows(&store, &da).await.unwrap(), a);
        assert_eq!(deleted_rows(&store, &db).await.unwrap(), b);
    }

    #[tokio::test]
    async fn inline_vectors_and_prefixed_paths_read() {
        let store = InMemory::new();
        let mut data = MAGIC.to_le_bytes().to_vec();
        rows(&[3, 4]).serialize_into(&mut data).unwrap();
        let inline = DeletionVectorDescriptor {
            storage_type: StorageType::Inline,
            path_or_inline_dv: z85::encode(&data),
            offset: None,
            size_in_bytes: data.len() as i32,
            cardinality: 2,
        };
        assert_eq!(deleted_rows(&store, &inline).await.unwrap(), rows(&[3, 4]));
        let uuid = uuid::Uuid::new_v4();
        assert_eq!(
            file_path(&format!("ab{}", z85::encode(uuid.as_bytes()))).unwrap(),
            Path::from(format!("ab/deletion_vector_{uuid}.bin"))
        );
        // A malformed path is an error, not a panic.
        assert_eq!(file_path(&format!("é{}", "x".repeat(19))), None);
        assert_eq!(file_path("short"), None);
    }

    #[tokio::test]
    async fn a_corrupt_vector_is_an_error_not_fewer_deletions() {
        let store = InMemory::new();
        let mut file = DvFile::default();
        let d = file.push(&rows(&[1, 2, 3])).unwrap();
        let path = Path::from(format!("deletion_vector_{}.bin", file.uuid));
        let mut bytes = file.bytes.clone();
        let last = bytes.len() - 6;
        bytes[last] ^= 0xff;
        store.put(&path, bytes.into()).await.unwrap();
        let err = deleted_rows(&store, &d).await.unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        let wrong = DeletionVectorDescriptor {
            cardinality: 4,
            ..d.clone()
        };
        file.put(&store).await.unwrap();
        let err = deleted_rows(&store, &wrong).await.unwrap_err().to_string();
        assert!(err.contains("not 4"), "{err}");
    }
}
