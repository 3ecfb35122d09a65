using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using Microsoft.Extensions.Options;
using OrleansIdempotency.AspNetCore;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.Once;

/// <summary>
/// <see cref="IOnceExecutor"/> on the key grains: the same claim, lease renewal, completion and release as the HTTP
/// layer, with a JSON result in place of a response.
/// </summary>
internal sealed partial class OnceExecutor(
    IdempotencyGrainCalls calls,
    IOptions<IdempotencyOptions> options,
    IdempotencyMetrics metrics,
    TimeProvider time,
    ILogger<OnceExecutor> logger) : IOnceExecutor
{
    /// <summary>The status a stored result carries, as an HTTP response would.</summary>
    internal const int ResultStatus = 200;

    /// <summary>
    /// How results are written and read, here and over HTTP: text beyond ASCII as its UTF-8, not escaped, since a result
    /// is measured against what the layer stores as written (<c>\u0436</c> would count 6 bytes for 2). Results are
    /// JSON data, never written into HTML. Public fields too: a tuple's items are fields, and a result stored without
    /// them would read back as defaults.
    /// </summary>
    internal static readonly JsonSerializerOptions Json = new(JsonSerializerOptions.Web) { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping, IncludeFields = true };

    /// <summary>What the scope of every <see cref="ExecuteOnceAsync"/> key begins with.</summary>
    internal const string AppScopePrefix = "once:app:";

    /// <summary>
    /// The grain key of a .NET caller's <paramref name="key"/>: a kind of scope of its own, apart from the keys of
    /// idempotent endpoints and from the Once API's HTTP callers (whatever <paramref name="scope"/> a caller names).
    /// </summary>
    internal static IdempotencyKey GrainKey(string scope, string key) => new(AppScopePrefix + scope, key);

    /// <summary>What the scope of every Once API key sent over HTTP begins with.</summary>
    internal const string HttpScopePrefix = "once:http:";

    /// <summary>The grain key of an HTTP caller's <paramref name="key"/>, in the caller's own scope.</summary>
    internal static IdempotencyKey HttpGrainKey(string callerScope, string key) => new(HttpScopePrefix + callerScope, key);

    /// <summary>
    /// <paramref name="result"/> as stored: its JSON in UTF-8, with <paramref name="readBack"/> what a replay reads of
    /// it as <typeparamref name="T"/>; null, with <paramref name="why"/>, when it cannot be written (a cycle, or code of
    /// the result's that throws as it runs: a getter, a lazy sequence's work) or does not read back (a string escaping
    /// half a surrogate pair is written, escaped, but taken back by no reader): stored, every replay of it would fail.
    /// </summary>
    internal static byte[]? StoredJson<T>(T result, out T? readBack, out Exception? why)
    {
        try
        {
            var body = JsonSerializer.SerializeToUtf8Bytes(result, Json);
            readBack = JsonSerializer.Deserialize<T>(body, Json);
            why = null;
            return body;
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            readBack = default;
            why = ex;
            return null;
        }
    }

    /// <summary>Why a completed key's result cannot be given: <paramref name="stored"/> holds none.</summary>
    internal static string NotStored(StoredResponse stored) => stored.BodyLength > 0
        ? $"The key completed, but its {stored.BodyLength}-byte result was larger than the layer stores."
        : "The key completed, but its result could not be stored as JSON that reads back.";

    /// <summary>
    /// SHA-256 of the input, the fingerprint a claim carries: of its UTF-8, or of its UTF-16 when it holds a lone
    /// surrogate, which UTF-8 would turn into U+FFFD and so give two inputs one fingerprint. The UTF-16 form starts
    /// with 0xFF, a byte no UTF-8 holds, so that no input's UTF-16 reads as another's UTF-8.
    /// </summary>
    internal static byte[] Fingerprint(string input)
    {
        if (IdempotencyKey.HasLoneSurrogate(input))
        {
            return SHA256.HashData([0xFF, .. MemoryMarshal.AsBytes(input.AsSpan())]);
        }

        if (input.Length <= FingerprintPieceBytes / 3)
        {
            return SHA256.HashData(Encoding.UTF8.GetBytes(input));
        }

        // A large input is hashed as its UTF-8 piece by piece, not encoded whole a second time beside its text. The
        // encoder carries a surrogate pair split between two pieces over.
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var encoder = Encoding.UTF8.GetEncoder();
        Span<byte> piece = stackalloc byte[FingerprintPieceBytes];
        var left = input.AsSpan();
        bool completed;
        do
        {
            encoder.Convert(left, piece, flush: true, out var charsUsed, out var bytesUsed, out completed);
            hash.AppendData(piece[..bytesUsed]);
            left = left[charsUsed..];
        }
        while (!completed);

        return hash.GetHashAndReset();
    }

    private const int FingerprintPieceBytes = 4096;

    /// <summary>What <see cref="IsStorableKey"/> asks of a key.</summary>
    internal static readonly string StorableKeyRule = $"A key is 1 to {IdempotencyKeyHeader.MaxLength} bytes of UTF-8 text: no NUL, no lone surrogate.";

    /// <summary>
    /// True for a key PostgreSQL can store as it is in the grain key (its text holds no NUL, UTF-8 no lone surrogate),
    /// beside a scope that may use the rest of what its index holds.
    /// </summary>
    internal static bool IsStorableKey(string key) =>
        key.Length > 0 && !key.Contains('\0') && !IdempotencyKey.HasLoneSurrogate(key) && Encoding.UTF8.GetByteCount(key) <= IdempotencyKeyHeader.MaxLength;

    public async Task<T> ExecuteOnceAsync<T>(OnceKey key, Func<CancellationToken, Task<T>> action, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(key);
        ArgumentException.ThrowIfNullOrEmpty(key.Key);
        ArgumentException.ThrowIfNullOrEmpty(key.Scope);
        ArgumentNullException.ThrowIfNull(action);
        if (!IsStorableKey(key.Key))
        {
            throw new ArgumentException(StorableKeyRule, nameof(key));
        }

        var policy = options.Value.DefaultPolicy;
        var grain = calls.Grain(GrainKey(key.Scope, key.Key));
        var request = new ClaimRequest(AttemptId.New(), Fingerprint(key.Input ?? ""), policy.Lease, policy.Retention, policy.OnLapsedLease);
        ClaimResult claim;
        DateTimeOffset askedAt;
        try
        {
            (claim, askedAt) = await calls.ClaimAsync(grain, request, policy.WaitTimeout, releaseUnanswered: true, cancellationToken);
        }
        catch (IdempotencyUnavailableException ex)
        {
            Record(IdempotencyProblem.Unavailable.Name);
            Log(log => LogUnavailable(log, ex, ex.Key));
            throw;
        }
        catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
        {
            Record(OnceResults.Abandoned);
            throw;
        }

        if (claim.Outcome == ClaimOutcome.Acquired)
        {
            return await RunAsync(key.Key, grain, claim.Token!.Value, askedAt + policy.Lease, policy, action, cancellationToken);
        }

        try
        {
            var replayed = claim.Outcome switch
            {
                ClaimOutcome.Completed => Replay<T>(key.Key, claim.Response!),
                ClaimOutcome.Mismatch => throw new OnceRefusedException(OnceRefusal.KeyReused, key.Key, $"Key '{key.Key}' was first used with another input; nothing ran."),
                ClaimOutcome.OutcomeUnknown => throw new OnceRefusedException(OnceRefusal.OutcomeUnknown, key.Key,
                    $"An earlier run of key '{key.Key}' stopped without its outcome; it may or may not have taken effect. It is not run again."),
                _ => throw new OnceRefusedException(OnceRefusal.InProgress, key.Key, $"Key '{key.Key}' is still running elsewhere; ask again later."),
            };
            Record(OnceResults.Replayed);
            return replayed;
        }
        catch (OnceRefusedException refused)
        {
            Record(ProblemOf(refused.Reason).Name);
            throw;
        }
        catch (Exception)
        {
            // A stored result that does not read back as T in a way JSON did not foresee (a type it cannot make).
            Record(OnceResults.Failed);
            throw;
        }
    }

    /// <summary>The problem the Once API answers over HTTP for a refusal.</summary>
    internal static IdempotencyProblem ProblemOf(OnceRefusal refusal) => refusal switch
    {
        OnceRefusal.KeyReused => IdempotencyProblem.KeyReused,
        OnceRefusal.InProgress => IdempotencyProblem.InProgress,
        OnceRefusal.OutcomeUnknown => IdempotencyProblem.OutcomeUnknown,
        _ => IdempotencyProblem.ResponseNotStored,
    };

    private void Record(string result) => metrics.RecordOnce(OnceOperations.Execute, result);

    // A log that cannot be written changes nothing: the caller gets the action's result or its exception, never the
    // log's, and the key is completed or released as it would be.
    private void Log(Action<ILogger> write) => LogLines.TryWrite(logger, write, static (log, write) => write(log));

    private async Task<T> RunAsync<T>(string key, IIdempotencyGrain grain, ClaimToken token, DateTimeOffset leaseEndsBy, IdempotencyPolicy policy,
        Func<CancellationToken, Task<T>> action, CancellationToken cancellationToken)
    {
        T result;
        StoredResponse stored;
        Exception? notStorable;
        using (new LeaseRenewal(grain, token, leaseEndsBy, policy.Lease, time, logger))
        {
            if (cancellationToken.IsCancellationRequested)
            {
                // Cancelled since the claim was answered: nothing began, so nothing is left in doubt.
                await calls.ReleaseAsync(grain, token.AttemptId, policy.Lease, policy.Retention);
                Record(OnceResults.Abandoned);
                cancellationToken.ThrowIfCancellationRequested();
            }

            try
            {
                result = await action(cancellationToken);
            }
            catch (Exception exception)
            {
                // Whatever it throws once its caller cancelled (a gRPC or SqlClient call cut off throws its own kind):
                // cut off midway, it may have taken effect.
                if (cancellationToken.IsCancellationRequested || !PolicyPredicates.Releases((options.Value, exception), static s => s.Value.OnceReleasesOnException(s.exception),
                        nameof(IdempotencyOptions.OnceReleasesOnException), logger))
                {
                    Record(OnceResults.InDoubt);
                    Log(log => LogLeftInDoubt(log, grain.GetPrimaryKeyString()));
                }
                else
                {
                    await calls.ReleaseAsync(grain, token.AttemptId, policy.Lease, policy.Retention);
                    Record(OnceResults.Released);
                }

                throw;
            }

            try
            {
                // Written while the claim is still renewed: a lazy result's work runs as it is written, however long.
                stored = StoredResult(ref result, policy, grain.GetPrimaryKeyString(), out notStorable);
            }
            catch (OutOfMemoryException)
            {
                // The action ran, and may have taken effect; what it returned cannot be written.
                Record(OnceResults.InDoubt);
                Log(log => LogResultUnwritable(log, grain.GetPrimaryKeyString()));
                throw;
            }
        }

        // Counted when the completion settles: at once, or once a completion left waiting for the store lands or is given up.
        if (await calls.CompleteAsync(grain, token, stored, policy.Lease, taken => Record(taken ? OnceResults.Executed : OnceResults.InDoubt)) is false)
        {
            Log(log => LogCompletionRefused(log, grain.GetPrimaryKeyString()));
        }

        // Refused to this caller as to every later one: handed back, a lazy sequence's work would run again as its
        // caller read it, and no later caller could have the same value.
        return notStorable is null ? result : throw NotStoredRefusal(key, NotStored(stored), notStorable);
    }

    /// <summary>
    /// <paramref name="result"/> as stored: its JSON when that reads back and fits; else marked not stored, so that
    /// later calls are refused as <see cref="OnceRefusal.ResultNotStored"/> instead of each failing to read it, or the
    /// key lapsing into an unknown outcome though it is known to have run. <paramref name="result"/> becomes what its
    /// JSON reads back as, which every replay returns when it fits the store; <paramref name="notStorable"/> says why
    /// there is none.
    /// </summary>
    private StoredResponse StoredResult<T>(ref T result, IdempotencyPolicy policy, string grainKey, out Exception? notStorable)
    {
        if (StoredJson(result, out var readBack, out notStorable) is not { } body)
        {
            var why = notStorable;
            Log(log => LogResultNotStorable(log, grainKey, why!));
            return new StoredResponse(ResultStatus, [], [], true, 0);
        }

        result = readBack!;
        return body.Length <= policy.MaxStoredResponseBytes
            ? new StoredResponse(ResultStatus, [], body, false, body.Length)
            : new StoredResponse(ResultStatus, [], [], true, body.Length);
    }

    private static T Replay<T>(string key, StoredResponse stored)
    {
        if (stored.BodyOmitted)
        {
            throw NotStoredRefusal(key, NotStored(stored));
        }

        try
        {
            return JsonSerializer.Deserialize<T>(stored.Body, Json)!;
        }
        catch (Exception ex) when (ex is JsonException or InvalidOperationException or NotSupportedException)
        {
            // Stored by a call asking another type, or settled by an operator with another value; or a type JSON cannot
            // make at all (a public field whose name a property's already takes).
            throw NotStoredRefusal(key, $"The key completed, but its stored result does not read as {typeof(T).Name}.", ex);
        }
    }

    private static OnceRefusedException NotStoredRefusal(string key, string why, Exception? inner = null) =>
        new(OnceRefusal.ResultNotStored, key, $"{why} Key '{key}' is not run again.", inner);

    [LoggerMessage(Level = LogLevel.Error, Message = "Once key {Key}: the action ran, but its result cannot be stored as JSON that reads back; this call and later ones are refused as result-not-stored.")]
    private static partial void LogResultNotStorable(ILogger logger, string key, Exception exception);

    [LoggerMessage(Level = LogLevel.Error, Message = "Once key {Key}: the action ran, but there was no memory to write its result; its claim is left to lapse, since it may have taken effect.")]
    private static partial void LogResultUnwritable(ILogger logger, string key);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Once key {Key}: the store or the cluster did not answer; nothing ran, and ExecuteOnceAsync threw IdempotencyUnavailableException.")]
    private static partial void LogUnavailable(ILogger logger, Exception exception, string key);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Once key {Key}: the action was cut off midway (cancelled, or an exception OnceReleasesOnException keeps); its claim is left to lapse, since it may have taken effect.")]
    private static partial void LogLeftInDoubt(ILogger logger, string key);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Once key {Key}: the claim's lease ran out before the result could be stored; later calls are refused as outcome-unknown.")]
    private static partial void LogCompletionRefused(ILogger logger, string key);
}
