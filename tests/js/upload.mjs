// Drives the stock tus-js-client against a blobd server, for tests/test_tus_clients.py.
//
//   node upload.mjs '{"endpoint": ..., "token": ..., "file": ..., ...}'
//
// Options: chunkSize, parallelUploads, metadata, uploadDataDuringCreation,
// overridePatchMethod, urlStorage (a file: remember and resume uploads),
// abortAfterChunks (stop like a closed browser tab after that many PATCHes).
// Prints one JSON line: {"status": "success"|"aborted", "url", "blobHash",
// "chunks" (PATCHes this run sent)}; exits non-zero with the error on failure.
import fs from 'node:fs'
import { FileUrlStorage, Upload } from 'tus-js-client'

const opts = JSON.parse(process.argv[2])

function upload() {
  return new Promise((resolve, reject) => {
    let chunks = 0
    const options = {
      endpoint: opts.endpoint,
      headers: { Authorization: `Bearer ${opts.token}` },
      chunkSize: opts.chunkSize ?? Infinity,
      parallelUploads: opts.parallelUploads ?? 1,
      metadata: opts.metadata ?? {},
      uploadDataDuringCreation: opts.uploadDataDuringCreation ?? false,
      overridePatchMethod: opts.overridePatchMethod ?? false,
      retryDelays: [],
      removeFingerprintOnSuccess: false,
      onChunkComplete() {
        chunks += 1
        if (opts.abortAfterChunks && chunks === opts.abortAfterChunks) {
          current.abort().then(() => resolve({ status: 'aborted', url: current.url, chunks }))
        }
      },
      onSuccess(payload) {
        const res = payload && payload.lastResponse
        resolve({
          status: 'success',
          url: current.url,
          blobHash: res ? res.getHeader('Blob-Hash') ?? null : null,
          chunks,
        })
      },
      onError: reject,
    }
    if (opts.urlStorage) options.urlStorage = new FileUrlStorage(opts.urlStorage)
    const current = new Upload(fs.createReadStream(opts.file), options)
    const begin = opts.urlStorage
      ? current.findPreviousUploads().then((previous) => {
          if (previous.length > 0) current.resumeFromPreviousUpload(previous[0])
        })
      : Promise.resolve()
    begin.then(() => current.start(), reject)
  })
}

upload().then(
  (result) => {
    process.stdout.write(`${JSON.stringify(result)}\n`)
  },
  (error) => {
    process.stderr.write(`tus-js-client failed: ${error}\n`)
    process.exit(1)
  },
)
