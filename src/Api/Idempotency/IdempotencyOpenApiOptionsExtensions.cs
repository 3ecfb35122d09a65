using System.Globalization;
using Microsoft.AspNetCore.OpenApi;
using Microsoft.Extensions.Options;
using Microsoft.OpenApi;

namespace OrleansIdempotency.AspNetCore;

/// <summary>Describes idempotent endpoints in the OpenAPI document: the header, its retention, the answers it adds.</summary>
public static class IdempotencyOpenApiOptionsExtensions
{
    /// <summary>
    /// Adds the <c>Idempotency-Key</c> header to every operation the layer makes idempotent, with the key's
    /// retention and what repeats get (draft-ietf-httpapi-idempotency-key-header-07 §2.3 asks servers to publish
    /// their expiry policy).
    /// </summary>
    public static OpenApiOptions AddIdempotency(this OpenApiOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        return options.AddOperationTransformer((operation, context, cancellationToken) =>
        {
            var metadata = context.Description.ActionDescriptor.EndpointMetadata.OfType<IIdempotencyMetadata>().LastOrDefault();
            if (metadata is null)
            {
                return Task.CompletedTask;
            }

            var policy = context.ApplicationServices.GetRequiredService<IOptions<IdempotencyOptions>>().Value.Resolve(metadata);
            if (context.Description.HttpMethod is not { } method || !policy.Methods.Contains(method))
            {
                return Task.CompletedTask;
            }

            operation.Parameters ??= [];
            operation.Parameters.Add(new OpenApiParameter
            {
                Name = IdempotencyKeyHeader.Name,
                In = ParameterLocation.Header,
                Required = policy.KeyRequired,
                Description = Describe(policy),
                Schema = new OpenApiSchema { Type = JsonSchemaType.String, MaxLength = IdempotencyKeyHeader.MaxLength },
            });
            return Task.CompletedTask;
        });
    }

    private static string Describe(IdempotencyPolicy policy)
    {
        var concurrent = policy.ConcurrentDuplicates == ConcurrentDuplicateHandling.Wait
            ? string.Create(CultureInfo.InvariantCulture, $"A repeat sent while the first still runs waits up to {Describe(policy.WaitTimeout)} for its response. ")
            : "A repeat sent while the first still runs gets 409 with Retry-After. ";
        return string.Create(CultureInfo.InvariantCulture,
                $"A unique value per logical request (a UUID, say), sent unchanged on every retry; at most {IdempotencyKeyHeader.MaxLength} characters. ")
            + string.Create(CultureInfo.InvariantCulture,
                $"The request runs once; repeats within {Describe(policy.Retention)} get the stored response with `Idempotent-Replayed: true`. ")
            + concurrent
            + "The same key with a different request gets 422.";
    }

    private static string Describe(TimeSpan span) =>
        span.TotalHours >= 1 && span.TotalHours == Math.Floor(span.TotalHours)
            ? string.Create(CultureInfo.InvariantCulture, $"{span.TotalHours:0} hours")
            : string.Create(CultureInfo.InvariantCulture, $"{span.TotalSeconds:0} seconds");
}
