using Microsoft.Extensions.Hosting;

namespace OrleansIdempotency.Silo.Hosting;

/// <summary>Puts a process into the idempotency cluster in the role its configuration names.</summary>
public static class IdempotencyHostApplicationBuilderExtensions
{
    /// <summary>
    /// Hosts a silo (<c>Orleans:Role=Silo</c>, the default) or joins the cluster as a client
    /// (<c>Orleans:Role=Client</c>); see <see cref="IdempotencyClusterSettings"/> for every key.
    /// </summary>
    public static IHostApplicationBuilder AddIdempotencyCluster(this IHostApplicationBuilder builder)
    {
        if (IdempotencyClusterSettings.From(builder.Configuration).Role == IdempotencyClusterRole.Client)
        {
            builder.UseOrleansClient(client => client.UseIdempotency(builder.Configuration));
        }
        else
        {
            builder.UseOrleans(silo => silo.UseIdempotency(builder.Configuration));
        }

        return builder;
    }
}
