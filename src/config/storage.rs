//! `backup_sites.<name>.object_storage`: where a site's archive lives, rohmu's keys.

use std::path::PathBuf;

use serde::Deserialize;

/// The Azure cloud of an `azure` object storage (rohmu's `azure_cloud`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AzureCloud {
    #[default]
    Public,
    China,
    Germany,
    Usgov,
}

impl AzureCloud {
    /// The endpoint suffix after `<account>.blob.`.
    pub fn endpoint_suffix(self) -> &'static str {
        match self {
            AzureCloud::Public => "core.windows.net",
            AzureCloud::China => "core.chinacloudapi.cn",
            AzureCloud::Germany => "core.cloudapi.de",
            AzureCloud::Usgov => "core.usgovcloudapi.net",
        }
    }
}

/// Where a site's archive lives (`object_storage`, tagged by `storage_type`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "storage_type", deny_unknown_fields)]
pub enum ObjectStorageConfig {
    #[serde(rename = "local")]
    Local {
        directory: PathBuf,
        prefix: Option<String>,
    },
    #[serde(rename = "s3")]
    S3 {
        region: Option<String>,
        bucket_name: String,
        aws_access_key_id: Option<String>,
        aws_secret_access_key: Option<String>,
        aws_session_token: Option<String>,
        host: Option<String>,
        port: Option<u16>,
        is_secure: Option<bool>,
        is_verify_tls: Option<bool>,
        encrypted: Option<bool>,
        prefix: Option<String>,
        segment_size: Option<u64>,
        proxy_info: Option<serde_json::Value>,
        storage_class: Option<String>,
        addressing_style: Option<String>,
    },
    #[serde(rename = "google")]
    Google {
        /// Accepted and ignored (`ignored.rs`): bucket operations do not need it.
        project_id: Option<String>,
        bucket_name: String,
        credential_file: Option<PathBuf>,
        credentials: Option<serde_json::Value>,
        prefix: Option<String>,
        proxy_info: Option<serde_json::Value>,
        /// walhoard extension (not pghoard's): a GCS-compatible server such as an emulator,
        /// like s3's `host`/`port`/`is_secure`. Without credentials its requests are unsigned.
        host: Option<String>,
        port: Option<u16>,
        is_secure: Option<bool>,
    },
    #[serde(rename = "azure")]
    Azure {
        account_name: String,
        account_key: Option<String>,
        sas_token: Option<String>,
        bucket_name: String,
        azure_cloud: Option<AzureCloud>,
        host: Option<String>,
        port: Option<u16>,
        is_secure: Option<bool>,
        prefix: Option<String>,
        proxy_info: Option<serde_json::Value>,
    },
    #[serde(rename = "swift")]
    Swift {
        user: String,
        key: String,
        auth_url: String,
        container_name: String,
        auth_version: Option<String>,
        segment_size: Option<u64>,
        tenant_name: Option<String>,
        region_name: Option<String>,
        user_id: Option<String>,
        user_domain_id: Option<String>,
        user_domain_name: Option<String>,
        tenant_id: Option<String>,
        project_id: Option<String>,
        project_name: Option<String>,
        project_domain_id: Option<String>,
        project_domain_name: Option<String>,
        service_type: Option<String>,
        endpoint_type: Option<String>,
        prefix: Option<String>,
    },
    #[serde(rename = "sftp")]
    Sftp {
        server: String,
        port: Option<u16>,
        username: String,
        password: Option<String>,
        private_key: Option<String>,
        prefix: Option<String>,
    },
}
